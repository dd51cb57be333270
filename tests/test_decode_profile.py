"""benchmarks/decode_profile.py's trace accounting on hand-made thunk events (the profiler run itself is a benchmark)."""

import pytest

from benchmarks import decode_profile


def _ev(op, ts, dur, module=decode_profile.PROGRAM, tid=1):
    return {"ph": "X", "name": op, "ts": ts, "dur": dur, "pid": 1, "tid": tid,
            "args": {"hlo_module": module, "hlo_op": op}}


def test_nested_thunks_count_once_as_self_time():
    events = [
        _ev("while.1", 0, 100),  # spans its body: 30 + 50 of its 100 us are the children's
        _ev("dot.2", 10, 30),
        _ev("while.3", 45, 50),  # nested while: 20 of its 50 us is its own child
        _ev("dynamic-slice_bitcast_fusion", 50, 20),
        _ev("dot.4", 200, 7),
        _ev("dot.4", 300, 7, tid=2),  # another thread: its own stack
        _ev("dot.9", 0, 999, module="jit__prefill"),  # another program: ignored
        {"ph": "i", "name": "marker", "ts": 5},
    ]
    self_us, calls = decode_profile.exclusive_times(events)
    assert dict(self_us) == {"while.1": 20, "dot.2": 30, "while.3": 30, "dynamic-slice_bitcast_fusion": 20,
                             "dot.4": 14}
    assert calls["dot.4"] == 2 and "dot.9" not in calls


def test_kinds_split_the_expert_loop_from_the_layer_slices():
    steps, layers = 2, 3
    events, t = [], 0
    for _ in range(steps):
        for _ in range(layers):
            events.append(_ev("dynamic-slice_bitcast_fusion.8", t, 5))  # a layer's weights, once per layer
            events.append(_ev("dot.1", t + 5, 10))
            for _ in range(8):  # grouped-matmul steps: 8 per layer
                events.append(_ev("dynamic-slice_bitcast_fusion", t + 15, 1))
                events.append(_ev("ynn_fusion", t + 16, 2))
                t += 3
            t += 15
        events.append(_ev("sort.2", t, 4))
        t += 4
    names = decode_profile.op_names("""
  %dynamic-slice_bitcast_fusion.8 = f32[1,64,32]{2,1,0} fusion(%p), kind=kLoop, calls=%fc, metadata={op_name="jit(_decode)/while/body/while/body/dynamic_slice" stack_frame_id=3}
  %dynamic-slice_bitcast_fusion = f32[64,32]{1,0} fusion(%a, %b), kind=kLoop, metadata={op_name="jit(_decode)/while/body/moe/routed_experts/grouped_glu/while/body/dynamic_slice"}
  ROOT %ynn_fusion = f32[8,32]{1,0} fusion(%c), kind=kCustom, metadata={op_name="jit(_decode)/while/body/moe/routed_experts/grouped_glu/while/body/dot_general"}
  %dot.1 = f32[1,32]{1,0} dot(%x, %y), lhs_contracting_dims={1}, rhs_contracting_dims={0}
""")
    assert names["ynn_fusion"].endswith("routed_experts/grouped_glu/while/body/dot_general") and "dot.1" not in names
    out = decode_profile.summarize(events, steps, names)
    kinds = {k: v["ms_per_step"] * 1e3 for k, v in out["kinds"].items()}
    assert kinds == pytest.approx({"other slices": 15, "dots": 30, "weight slices (experts)": 24,
                                   "expert loop": 48, "other": 4})
    assert sum(v["share"] for v in out["kinds"].values()) == pytest.approx(1.0)
    assert out["total_ms_per_step"] == pytest.approx(121e-3)


def test_a_trace_without_the_decode_program_is_an_error():
    with pytest.raises(RuntimeError, match="no thunk events of jit__decode"):
        decode_profile.summarize([_ev("dot.1", 0, 1, module="jit__prefill")], 1, {})
