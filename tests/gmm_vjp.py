"""Jitted forward + VJP of a grouped matmul, the harness every grouped-matmul test suite compares backends with."""

import jax


def glu_vjp(fn):
    """fn(x, w_gate, w_up, group_sizes) -> (h, (dx, dw_gate, dw_up)) for the cotangent d_h."""

    def run(x, w_gate, w_up, gs, d_h):
        h, pullback = jax.vjp(lambda a, b, c: fn(a, b, c, gs), x, w_gate, w_up)
        return h, pullback(d_h.astype(h.dtype))

    return jax.jit(run)


def gmm_vjp(fn):
    """fn(lhs, rhs, group_sizes) -> (y, (d_lhs, d_rhs)) for the cotangent d_y."""

    def run(h, w_down, gs, d_y):
        y, pullback = jax.vjp(lambda a, b: fn(a, b, gs), h, w_down)
        return y, pullback(d_y.astype(y.dtype))

    return jax.jit(run)
