"""Eager forwards on CUDA keep away from cuDNN's attention (a plan built per new sequence length:
+60 ms on the first prefill of every new prompt length on an H200) and leave torch's global SDPA
switches as they were; on a CPU nothing changes."""

import torch

from decodekit.components import eager_attention

FLAGS = ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled", "cudnn_sdp_enabled")


def flags():
    return {f: getattr(torch.backends.cuda, f)() for f in FLAGS}


def test_cuda_forwards_exclude_cudnn_attention_and_restore_the_switches():
    before = flags()
    with eager_attention(torch.device("cuda")):
        inside = flags()
    assert inside == {"flash_sdp_enabled": True, "mem_efficient_sdp_enabled": True, "math_sdp_enabled": True,
                      "cudnn_sdp_enabled": False}
    assert flags() == before


def test_cpu_forwards_change_nothing():
    torch.backends.cuda.enable_cudnn_sdp(True)
    with eager_attention(torch.device("cpu")):
        assert flags()["cudnn_sdp_enabled"]
