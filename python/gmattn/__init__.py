"""gmattn: Gaussian Mixture Attention (arXiv:2606.18283) as a fast, installable sequence mixer.

    import gmattn
    out = gmattn.gma_attention(q, k, v, mu, omega, alpha, causal=True)

`gma_attention` takes torch tensors (CPU or CUDA, with autograd), MLX arrays or NumPy arrays and
returns the caller's type. Layers live in `gmattn.torch` and `gmattn.mlx`; the naive and chunked
pure-PyTorch implementations used as references live in `gmattn.reference`.
"""

__version__ = "0.1.0"

from . import _checks
from .mixers import MixerConfig, build_block, build_mixer, build_model  # noqa: E402 (imports no framework)

__all__ = ["gma_attention", "MixerConfig", "build_mixer", "build_block", "build_model", "empty_cache",
           "buffer_cache_info", "__version__"]


def __dir__():
    # The public namespace is __all__; submodules (gmattn.torch, gmattn.mlx, gmattn.reference, ...)
    # are imported by name.
    return sorted(__all__)


def empty_cache() -> int:
    """Hands the CPU buffer cache's kept blocks back to the system and returns their bytes.

    The torch front end takes CPU outputs of 1 MiB or more from the core's buffer cache, which
    keeps released blocks for reuse (a training loop then writes into memory it already has,
    instead of page-faulting fresh memory every step). Its budget, GMATTN_BUFFER_CACHE_MIB, is
    by default an eighth of the physical memory (at least 512 MiB); 0 turns the cache off. Like
    ``torch.cuda.empty_cache()``, this frees only blocks no tensor uses.

        >>> import gmattn
        >>> released = gmattn.empty_cache()
        >>> gmattn.buffer_cache_info()["held_bytes"]
        0
    """
    from . import _ext

    return _ext.core().empty_buffer_cache()


def buffer_cache_info() -> dict:
    """The CPU buffer cache: ``held_bytes`` (released blocks kept now) and ``budget_bytes``."""
    from . import _ext

    return dict(_ext.core().buffer_cache_info())


_FRONT_ENDS: dict = {}
"""array type -> (its framework, the gma_attention of its front end), for the types met so far (a
call does not repeat the type test and the import: a one-token step is a few tens of microseconds)."""


def _front_end(kind: str):
    if kind == "torch":
        from .torch.ops import gma_attention as impl
    elif kind == "mlx":
        from .mlx.ops import gma_attention as impl
    else:
        from .numpy_ops import gma_attention as impl
    return impl


def _framework(x) -> str:
    framework = _checks.array_framework(x)
    if framework is None:
        raise TypeError(
            f"gma_attention: 'q' must be a torch.Tensor, an mlx.core.array or a numpy.ndarray, got {_checks.type_name(x)}"
        )
    return framework


def gma_attention(q, k, v, mu, omega, alpha, *, causal=False, key_padding_mask=None, initial_state=None,
                  output_final_state=False, eps=1e-6, sigma_eps=1e-4, cu_seqlens=None, state_in_place=False):
    """Gaussian Mixture Attention.

    Args:
        q, k: (B, N, H, D) queries and keys (routing space); v: (B, N, H, Dv) values.
        mu, omega: (H, K, D) component means and raw variances (sigma^2 = softplus(omega) + sigma_eps).
        alpha: (H, K) prior logits.
        causal: position i reads only keys j <= i.
        key_padding_mask: (B, N) bool, True = real token; masked keys write nothing.
        initial_state: optional (S (B, H, K, Dv), z (B, H, K)) memory to start from.
        output_final_state: also return the state (S, z) after the last token.
        eps: added to the read denominator. sigma_eps: floor of the variances.
        cu_seqlens: packed sequences: a 1-D int32/int64 array of S + 1 offsets, 0 = cu_seqlens[0]
            <= ... <= cu_seqlens[S] = N (empty sequences allowed), for q, k, v of B = 1 holding the
            S sequences one after another. Each sequence is attended on its own (causal reads
            restart at its first token); initial_state and the final state have S in place of B.
            Not with key_padding_mask.
        state_in_place: NumPy arrays only: write the final state into initial_state's arrays
            (writable, C-contiguous, of the state's dtype) instead of new ones, for a decoding
            loop that carries its state; they are the state returned with output_final_state.

    Returns:
        out (B, N, H, Dv) in the caller's array type and device, or (out, (S, z)) when
        output_final_state. The state is float32 (float64 for float64 inputs).
    """
    known = _FRONT_ENDS.get(type(q))
    if known is None:
        framework = _framework(q)
        known = _FRONT_ENDS[type(q)] = (framework, _front_end(framework))
    framework, impl = known
    if state_in_place:
        if framework != "numpy":
            raise ValueError("gma_attention: state_in_place=True is for NumPy arrays; the torch and MLX front ends "
                             "return the final state as new arrays (output_final_state=True)")
        return impl(q, k, v, mu, omega, alpha, causal=causal, key_padding_mask=key_padding_mask,
                    initial_state=initial_state, output_final_state=output_final_state, eps=eps,
                    sigma_eps=sigma_eps, cu_seqlens=cu_seqlens, state_in_place=True)
    return impl(q, k, v, mu, omega, alpha, causal=causal, key_padding_mask=key_padding_mask,
                initial_state=initial_state, output_final_state=output_final_state, eps=eps, sigma_eps=sigma_eps,
                cu_seqlens=cu_seqlens)
