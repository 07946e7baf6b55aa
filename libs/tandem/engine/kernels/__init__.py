"""Triton kernels of the ``triton`` attention backend, each beside its torch reference.

Every kernel here runs on CUDA for speed and on CPU through the Triton interpreter
(``TRITON_INTERPRET=1``) in the tests, where it is compared with its ``*_ref``
function. Import this package only when the triton backend is selected: the CPU
engine (``torch_native``) does not need triton.
"""


def default_num_splits(batch_size: int, num_kv_heads: int, num_sms: int) -> int:
    """Split-K ranges per request for paged decode attention: enough (request, kv head, split)
    programs to fill the GPU twice over, a power of two in 1..16. Picked on the host (it is a
    kernel constant); a split shorter than the kernel's block of tokens stays empty."""
    want = -(-2 * num_sms // max(1, batch_size * num_kv_heads))
    n = 1
    while n < want and n < 16:
        n *= 2
    return n
