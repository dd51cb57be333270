"""Image VAE of Ming-flash-omni 2.0: diffusers' `AutoencoderKL` in the Flux.1 layout, channels-last.

    decode (generation):  DiT latents [B, L, h, w]
        -> z = latents / scaling_factor + shift_factor                    (the pipeline's decoder input)
        -> post_quant_conv (1x1, optional) -> conv_in -> mid block (resnet, self-attention over h*w, resnet)
        -> per level, coarsest first: (layers_per_block + 1) resnets, nearest x2 + 3x3 conv (all but the last)
        -> GroupNorm, SiLU, conv_out                                      image [B, 3, H, W], nominally [-1, 1]
        -> postprocess: clamp((x + 1) / 2, 0, 1)
    encode (editing reference):  image [B, 3, H, W] in [-1, 1]
        -> conv_in -> per level: layers_per_block resnets, pad bottom/right by 1 + 3x3 stride-2 conv (all but the last)
        -> mid block -> GroupNorm, SiLU, conv_out -> quant_conv (1x1, optional)      [B, 2L, h, w]
        -> mean, logvar = the two channel halves; logvar clamped to [-30, 20]
        -> encode_mode: (mean - shift_factor) * scaling_factor           (the posterior's mode, in DiT space)

Layout: the public functions take and return NCHW like the release; inside, everything is NHWC (channels on the
lanes, the layout TPU and GPU convs want), so each call transposes once on the way in and once on the way out.
Conv kernels are [kh, kw, in, out] (HWIO). H = h * scale_factor, W = w * scale_factor.

Numerics: convs and projections take runtime.dtype inputs and accumulate in float32; every GroupNorm (32 groups in
the release, eps 1e-6) takes its statistics and affine in float32; the mid-block attention is one head as wide as
the channels (512 in Flux), scale C ** -0.5, float32 softmax, through `ming_jax.pallas.attention.api.attention` so a
large image (a 1024 x 1024 decode is 16k tokens there) can take the TPU splash kernel. Results come back in the dtype
of the input array.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ming_jax.config.runtime import Runtime
from ming_jax.config.vae import VAEConfig
from ming_jax.layers.linear import Linear
from ming_jax.layers.params import fan_in_normal, ones, param, read, zeros
from ming_jax.pallas.attention.api import attention

# Logical axis names of the VAE's channel dims (conv kernels, biases, the attention projections). The kernel taps
# (kh, kw) are never split and carry None.
CONV_IN, CONV_OUT = "conv_in", "conv_out"
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps the log-variance to this


# --- pure math -------------------------------------------------------------------------------------------------------


def conv2d(x, kernel, bias, *, stride: int = 1, padding=((1, 1), (1, 1))):
    """x [B, H, W, Cin], kernel [kh, kw, Cin, Cout], bias [Cout] -> [B, H', W', Cout] in x's dtype (zero padding
    `((top, bottom), (left, right))`, float32 accumulation)."""
    y = jax.lax.conv_general_dilated(x, kernel, window_strides=(stride, stride), padding=padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32)
    return (y + bias.astype(jnp.float32)).astype(x.dtype)


def group_norm(x, scale, bias, groups: int, eps: float):
    """x [B, H, W, C], scale / bias [C] -> [B, H, W, C] in x's dtype.

    Channels split into `groups` consecutive groups (torch's GroupNorm order); mean and biased variance per (sample,
    group) over all pixels and the group's channels, all in float32, cast back once at the end.
    """
    b, h, w, c = x.shape
    xf = x.astype(jnp.float32).reshape(b, h * w, groups, c // groups)  # [B, HW, G, C/G]
    mean = jnp.mean(xf, axis=(1, 3), keepdims=True)  # [B, 1, G, 1]
    var = jnp.mean(jnp.square(xf - mean), axis=(1, 3), keepdims=True)
    y = ((xf - mean) * jax.lax.rsqrt(var + eps)).reshape(b, h, w, c)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def upsample_nearest(x):
    """[B, H, W, C] -> [B, 2H, 2W, C], each pixel copied into a 2 x 2 block (torch `interpolate(mode="nearest")`)."""
    b, h, w, c = x.shape
    return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


def postprocess(image):
    """Decoded image [B, C, H, W] nominally in [-1, 1] -> [0, 1] (the pipeline's image processor, `pt` output)."""
    return jnp.clip((image + 1.0) / 2.0, 0.0, 1.0)


def to_decoder_input(cfg: VAEConfig, latents):
    """DiT-space latents -> what `vae.decode` is fed: latents / scaling_factor + shift_factor (any layout)."""
    return latents / cfg.scaling_factor + cfg.shift


def to_dit_latents(cfg: VAEConfig, z):
    """A VAE latent (the posterior's mode) -> DiT space: (z - shift_factor) * scaling_factor (any layout)."""
    return (z - cfg.shift) * cfg.scaling_factor


# --- layers ----------------------------------------------------------------------------------------------------------


class Conv2d(nnx.Module):
    """k x k conv, "same" zero padding for stride 1; `padding` overrides it (the downsampler's asymmetric pad)."""

    def __init__(self, c_in: int, c_out: int, k: int = 3, *, stride: int = 1, padding=None, param_dtype,
                 rngs: nnx.Rngs):
        self.stride = stride
        self.padding = ((k // 2, k // 2),) * 2 if padding is None else tuple(tuple(p) for p in padding)
        self.kernel = param(rngs, fan_in_normal((0, 1, 2)), (k, k, c_in, c_out), (None, None, CONV_IN, CONV_OUT),
                            param_dtype)
        self.bias = param(rngs, zeros, (c_out,), (CONV_OUT,), param_dtype)

    def __call__(self, x):  # [B, H, W, Cin] -> [B, H', W', Cout]
        dt = x.dtype
        return conv2d(x, read(self.kernel, dt), read(self.bias, dt), stride=self.stride, padding=self.padding)


class GroupNorm(nnx.Module):
    def __init__(self, channels: int, groups: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        self.groups, self.eps = groups, eps
        self.scale = param(rngs, ones, (channels,), ("norm",), param_dtype)
        self.bias = param(rngs, zeros, (channels,), ("norm",), param_dtype)

    def __call__(self, x):  # [B, H, W, C]
        return group_norm(x, read(self.scale, jnp.float32), read(self.bias, jnp.float32), self.groups, self.eps)


class ResnetBlock(nnx.Module):
    """norm1, SiLU, conv1 (c_in -> c_out), norm2, SiLU, conv2, plus the input (through a 1x1 conv when the width
    changes). No time embedding and no dropout: the VAE has neither at inference."""

    def __init__(self, cfg: VAEConfig, c_in: int, c_out: int, *, param_dtype, rngs: nnx.Rngs):
        g, eps, pdt = cfg.norm_num_groups, cfg.norm_eps, param_dtype
        self.norm1 = GroupNorm(c_in, g, eps, param_dtype=pdt, rngs=rngs)
        self.conv1 = Conv2d(c_in, c_out, param_dtype=pdt, rngs=rngs)
        self.norm2 = GroupNorm(c_out, g, eps, param_dtype=pdt, rngs=rngs)
        self.conv2 = Conv2d(c_out, c_out, param_dtype=pdt, rngs=rngs)
        self.conv_shortcut = Conv2d(c_in, c_out, 1, param_dtype=pdt, rngs=rngs) if c_in != c_out else None

    def __call__(self, x):  # [B, H, W, Cin] -> [B, H, W, Cout]
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class SpatialSelfAttention(nnx.Module):
    """GroupNorm, then single-head self-attention over all H * W pixels (head width = channels), output projection,
    plus the input."""

    def __init__(self, cfg: VAEConfig, channels: int, runtime: Runtime, *, rngs: nnx.Rngs):
        pdt, axes = jnp.dtype(runtime.param_dtype), (CONV_IN, CONV_OUT)
        self.impl = runtime.attention
        self.group_norm = GroupNorm(channels, cfg.norm_num_groups, cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.to_q = Linear(channels, channels, axes, param_dtype=pdt, rngs=rngs)
        self.to_k = Linear(channels, channels, axes, param_dtype=pdt, rngs=rngs)
        self.to_v = Linear(channels, channels, axes, param_dtype=pdt, rngs=rngs)
        self.to_out = Linear(channels, channels, axes, param_dtype=pdt, rngs=rngs)

    def __call__(self, x):  # [B, H, W, C]
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, h * w, c)  # [B, T, C], T = H * W in row-major pixel order
        q, k, v = (proj(t).reshape(b, h * w, 1, c) for proj in (self.to_q, self.to_k, self.to_v))  # [B, T, 1, C]
        o = attention(q, k, v, None, impl=self.impl, pad_head_dim=True)  # [B, T, 1, C]
        return x + self.to_out(o.reshape(b, h * w, c)).reshape(b, h, w, c)


class MidBlock(nnx.Module):
    """resnet, self-attention (when `mid_block_add_attention`), resnet; all at the coarsest width."""

    def __init__(self, cfg: VAEConfig, runtime: Runtime, *, rngs: nnx.Rngs):
        c, pdt = cfg.block_out_channels[-1], jnp.dtype(runtime.param_dtype)
        self.resnets = nnx.List([ResnetBlock(cfg, c, c, param_dtype=pdt, rngs=rngs) for _ in range(2)])
        self.attention = SpatialSelfAttention(cfg, c, runtime, rngs=rngs) if cfg.mid_block_add_attention else None

    def __call__(self, x):  # [B, h, w, C]
        with jax.named_scope("vae_mid_block"):
            x = self.resnets[0](x)
            if self.attention is not None:
                with jax.named_scope("vae_mid_attention"):
                    x = self.attention(x)
            return self.resnets[1](x)


class Level(nnx.Module):
    """One resolution level: resnets (the first one c_in -> c_out), then an optional sampler conv.

    Encoder ("down"): pad bottom / right by one pixel, 3x3 stride-2 conv (diffusers' `padding=0` Downsample2D), so
    an even side halves exactly. Decoder ("up"): nearest x2, then a 3x3 conv.
    """

    def __init__(self, cfg: VAEConfig, c_in: int, c_out: int, n_resnets: int, sampler: str | None, *, param_dtype,
                 rngs: nnx.Rngs):
        pdt = param_dtype
        self.resnets = nnx.List([ResnetBlock(cfg, c_in if j == 0 else c_out, c_out, param_dtype=pdt, rngs=rngs)
                                 for j in range(n_resnets)])
        self.downsample = (Conv2d(c_out, c_out, stride=2, padding=((0, 1), (0, 1)), param_dtype=pdt, rngs=rngs)
                           if sampler == "down" else None)
        self.upsample = Conv2d(c_out, c_out, param_dtype=pdt, rngs=rngs) if sampler == "up" else None

    def __call__(self, x):  # [B, H, W, Cin] -> [B, H / 2 | H | 2H, ..., Cout]
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(upsample_nearest(x))
        return x


# --- encoder / decoder -----------------------------------------------------------------------------------------------


class VAEEncoder(nnx.Module):
    """image [B, H, W, C_img] -> moments [B, H / f, W / f, 2 * latent_channels] (before quant_conv), f = scale_factor."""

    def __init__(self, cfg: VAEConfig, runtime: Runtime, *, rngs: nnx.Rngs):
        pdt, c, last = jnp.dtype(runtime.param_dtype), cfg.block_out_channels, cfg.num_levels - 1
        self.conv_in = Conv2d(cfg.in_channels, c[0], param_dtype=pdt, rngs=rngs)
        self.down_blocks = nnx.List([
            Level(cfg, c_in, c_out, cfg.layers_per_block, None if i == last else "down", param_dtype=pdt, rngs=rngs)
            for i, (c_in, c_out) in enumerate(cfg.down_block_channels())])
        self.mid_block = MidBlock(cfg, runtime, rngs=rngs)
        self.conv_norm_out = GroupNorm(c[-1], cfg.norm_num_groups, cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.conv_out = Conv2d(c[-1], cfg.encoder_out_channels, param_dtype=pdt, rngs=rngs)

    def __call__(self, x):
        x = self.conv_in(x)  # [B, H, W, c0]
        for i, block in enumerate(self.down_blocks):
            with jax.named_scope(f"vae_down_{i}"):
                x = block(x)  # [B, H / 2^i', W / 2^i', c_i]
        x = self.mid_block(x)  # [B, h, w, c_last]
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))  # [B, h, w, 2L]


class VAEDecoder(nnx.Module):
    """latent [B, h, w, latent_channels] (after post_quant_conv) -> image [B, h * f, w * f, out_channels]."""

    def __init__(self, cfg: VAEConfig, runtime: Runtime, *, rngs: nnx.Rngs):
        pdt, c, last = jnp.dtype(runtime.param_dtype), cfg.block_out_channels, cfg.num_levels - 1
        self.conv_in = Conv2d(cfg.latent_channels, c[-1], param_dtype=pdt, rngs=rngs)
        self.mid_block = MidBlock(cfg, runtime, rngs=rngs)
        self.up_blocks = nnx.List([
            Level(cfg, c_in, c_out, cfg.layers_per_block + 1, None if i == last else "up", param_dtype=pdt,
                  rngs=rngs)
            for i, (c_in, c_out) in enumerate(cfg.up_block_channels())])
        self.conv_norm_out = GroupNorm(c[0], cfg.norm_num_groups, cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.conv_out = Conv2d(c[0], cfg.out_channels, param_dtype=pdt, rngs=rngs)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))  # [B, h, w, c_last]
        for i, block in enumerate(self.up_blocks):
            with jax.named_scope(f"vae_up_{i}"):
                x = block(x)  # doubles the sides on every level but the last
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))  # [B, H, W, C_img]


class AutoencoderKL(nnx.Module):
    """Encoder, decoder and the optional 1x1 quant convs: the module whose parameters `ming_jax.weights.vae.vae_table`
    names. Methods are NHWC; the module-level functions are the NCHW, jitted API."""

    def __init__(self, cfg: VAEConfig, runtime: Runtime | None = None, *, rngs: nnx.Rngs):
        runtime = Runtime() if runtime is None else runtime
        self.cfg, self.runtime = cfg, runtime
        pdt, two_l = jnp.dtype(runtime.param_dtype), cfg.encoder_out_channels
        self.encoder = VAEEncoder(cfg, runtime, rngs=rngs)
        self.decoder = VAEDecoder(cfg, runtime, rngs=rngs)
        self.quant_conv = Conv2d(two_l, two_l, 1, param_dtype=pdt, rngs=rngs) if cfg.use_quant_conv else None
        self.post_quant_conv = (Conv2d(cfg.latent_channels, cfg.latent_channels, 1, param_dtype=pdt, rngs=rngs)
                                if cfg.use_post_quant_conv else None)

    def decode_nhwc(self, z):
        """diffusers' `vae.decode(z).sample`: z [B, h, w, L] (the decoder input, already un-scaled) -> [B, H, W, C]."""
        check_latents(self.cfg, z.shape, "NHWC")
        with jax.named_scope("vae_decode"):
            x = z.astype(self.runtime.dtype)
            if self.post_quant_conv is not None:
                x = self.post_quant_conv(x)
            return self.decoder(x).astype(z.dtype)

    def encode_nhwc(self, image):
        """image [B, H, W, C] in [-1, 1] -> (mean, logvar), each [B, H / f, W / f, L]; logvar clamped."""
        check_image(self.cfg, image.shape, "NHWC")
        with jax.named_scope("vae_encode"):
            moments = self.encoder(image.astype(self.runtime.dtype))  # [B, h, w, 2L]
            if self.quant_conv is not None:
                moments = self.quant_conv(moments)
            moments = moments.astype(jnp.float32)
            mean, logvar = jnp.split(moments, 2, axis=-1)
            return mean.astype(image.dtype), jnp.clip(logvar, *LOGVAR_RANGE).astype(image.dtype)


# --- input checks ----------------------------------------------------------------------------------------------------


def check_latents(cfg: VAEConfig, shape, layout: str = "NCHW") -> None:
    channels = shape[1] if layout == "NCHW" else shape[-1]
    if len(shape) != 4 or channels != cfg.latent_channels:
        raise ValueError(f"VAE latents: expected {layout} with {cfg.latent_channels} latent channels, got shape "
                         f"{tuple(shape)}")


def check_image(cfg: VAEConfig, shape, layout: str = "NCHW") -> None:
    if len(shape) != 4:
        raise ValueError(f"VAE image: expected a 4-D {layout} batch, got shape {tuple(shape)}")
    channels, (h, w) = (shape[1], shape[2:]) if layout == "NCHW" else (shape[-1], shape[1:3])
    if channels != cfg.in_channels:
        raise ValueError(f"VAE image: expected {cfg.in_channels} channels ({layout}), got shape {tuple(shape)}")
    f = cfg.scale_factor
    if h % f or w % f:
        raise ValueError(f"VAE image: height and width must be multiples of the scale factor {f}, got {h} x {w} "
                         f"(shape {tuple(shape)})")


# --- jitted NCHW API -------------------------------------------------------------------------------------------------

_to_nhwc = functools.partial(jnp.transpose, axes=(0, 2, 3, 1))
_to_nchw = functools.partial(jnp.transpose, axes=(0, 3, 1, 2))


@nnx.jit
def _decode(model: AutoencoderKL, z):
    return _to_nchw(model.decode_nhwc(_to_nhwc(z)))


@nnx.jit
def _encode(model: AutoencoderKL, image):
    mean, logvar = model.encode_nhwc(_to_nhwc(image))
    return _to_nchw(mean), _to_nchw(logvar)


def decode_sample(model: AutoencoderKL, z):
    """diffusers' `vae.decode(z).sample` on an already un-scaled latent z [B, L, h, w] -> [B, C, h * f, w * f],
    nominally in [-1, 1] and not clamped. Compiles once per shape and dtype."""
    z = jnp.asarray(z)
    check_latents(model.cfg, z.shape)
    return _decode(model, z)


def decode(model: AutoencoderKL, latents):
    """The pipeline's decode: DiT-space latents [B, L, h, w] -> image [B, C, h * f, w * f] (`postprocess` maps it to
    [0, 1]). The decoder input is `to_decoder_input(cfg, latents)`, computed before the jitted decoder (one
    elementwise op; `decode` and `decode_sample` then share one compiled program per shape)."""
    latents = jnp.asarray(latents)
    check_latents(model.cfg, latents.shape)
    return decode_sample(model, to_decoder_input(model.cfg, latents))


def encode(model: AutoencoderKL, image):
    """image [B, C, H, W] in [-1, 1], H and W multiples of the scale factor -> the posterior's (mean, logvar), each
    [B, L, H / f, W / f], logvar clamped to [-30, 20] as diffusers does. Compiles once per shape and dtype."""
    image = jnp.asarray(image)
    check_image(model.cfg, image.shape)
    return _encode(model, image)


def encode_mode(model: AutoencoderKL, image):
    """The editing path's reference latent: (posterior mode - shift_factor) * scaling_factor, [B, L, h, w]."""
    mean, _ = encode(model, image)
    return to_dit_latents(model.cfg, mean)
