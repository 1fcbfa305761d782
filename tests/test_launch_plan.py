"""The forward's launch plan on a GPU (entflash.kernels.launch.make_spec), checked on the CPU: the plan depends
only on shapes, dtypes and launch.interpreting(), never on where the tensors live."""
from __future__ import annotations

import pytest
import torch

from entflash.kernels import launch


@pytest.fixture
def gpu_plan(monkeypatch):
    """make_spec as it plans on a GPU (not under the interpreter), for (B, H, N, D) inputs of `dtype`."""
    monkeypatch.setattr(launch, "interpreting", lambda: False)

    def plan(dtype, D, N=200, H=2):
        q = torch.randn(1, H, N, D).to(dtype)
        k = torch.randn(1, H, N, D).to(dtype)
        alpha_t = torch.full((H,), 1.5)
        return launch.make_spec(q, k, 1.5, alpha_t, True, None, None, None)
    return plan


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [32, 64, 96, 128])
def test_16bit_inputs_take_64_row_blocks_with_4_warps(gpu_plan, dtype, D):
    spec = gpu_plan(dtype, D)
    assert spec.tiles["BLOCK_M"] == 64 and spec.sparse_launch["num_warps"] == 4
    assert spec.sweep_block_m == 64 and spec.sweep_launch["num_warps"] == 4
    # one program per 64 query rows and (batch, head), one candidate list per program
    assert spec.grid == (4, 2) and spec.lists.numel() == 4 * 2 * spec.nk_chunk


@pytest.mark.parametrize("D", [64, 128])
def test_float32_inputs_take_128_row_blocks_with_8_warps(gpu_plan, D):
    spec = gpu_plan(torch.float32, D)
    assert spec.tiles["BLOCK_M"] == 128 and spec.sparse_launch["num_warps"] == 8
    assert spec.sweep_block_m == 128 and spec.sweep_launch["num_warps"] == 8
    assert spec.grid == (2, 2)


def test_head_dim_256_takes_64_row_blocks_with_8_warps(gpu_plan):
    spec = gpu_plan(torch.bfloat16, 256)
    assert spec.tiles["BLOCK_M"] == 64 and spec.tiles["BLOCK_D"] == 256 and spec.sparse_launch["num_warps"] == 8


def test_interpreter_takes_64_row_blocks(monkeypatch):
    monkeypatch.setattr(launch, "interpreting", lambda: True)
    q = torch.randn(1, 2, 200, 128)
    spec = launch.make_spec(q, q, 1.5, torch.full((2,), 1.5), False, None, None, None)
    assert spec.tiles["BLOCK_M"] == 64
