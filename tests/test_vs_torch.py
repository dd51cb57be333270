"""benchmarks/vs_torch.py: its refusals, and (with the official files, MING_OFFICIAL_DIR) a tiny side-by-side run."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import vs_torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_without_the_official_files_it_measures_nothing_and_says_why(tmp_path, capsys):
    assert vs_torch.main([]) == 0
    assert "no --official folder given" in capsys.readouterr().out
    (tmp_path / "modeling_utils.py").write_text("")
    assert vs_torch.main(["--official", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "lacks modeling_bailing_moe_v2.py, configuration_bailing_moe_v2.py" in out and "nothing was measured" in out


def test_unknown_case_is_an_error(tmp_path):
    for f in vs_torch.OFFICIAL_FILES:
        (tmp_path / f).write_text("")
    pytest.importorskip("torch")
    with pytest.raises(SystemExit):
        vs_torch.main(["--official", str(tmp_path), "--cases", "prefill_1x512,nope"])


@pytest.mark.torch
@pytest.mark.skipif(not os.environ.get("MING_OFFICIAL_DIR"), reason="MING_OFFICIAL_DIR (the official python files) "
                    "not set: the side-by-side run needs them and this project does not ship them")
def test_tiny_run_both_sides_agree(tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.vs_torch", "--official", os.environ["MING_OFFICIAL_DIR"],
                        "--tiny", "--reps", "1", "--cases", "prefill_1x512,generate_b8,moe_t2048", "--json", str(out)],
                       cwd=REPO, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {row["case"]: row for row in json.loads(out.read_text())["results"]}
    assert rows["generate_b8"]["tokens_identical"]
    for name in ("prefill_1x512", "moe_t2048"):
        assert rows[name]["max_abs_diff"] <= 1e-4 * rows[name]["max_abs_ref"]
