"""The demo (`python -m entflash demo`) through its main(): runs, prints its table, fails loudly when wrong."""
import re

import torch

from entflash import cli

TINY = ["demo", "--device", "cpu", "--seq-len", "80", "--heads", "2", "--head-dim", "12", "--batch", "2",
        "--seed", "3", "--time-budget", "0"]


def test_demo_prints_its_table_and_passes(capsys):
    assert cli.main(TINY + ["--alpha", "1.7"]) == 0
    printed = capsys.readouterr().out
    assert "B=2 H=2 N=80 D=12 alpha=1.7 causal" in printed and "backend=torch" in printed
    for row in ("support per row (mean)", "support per row (min / max)", "block sparsity (64x64 tiles)",
                "max |error| vs float64", "forward time (ms)", "forward+backward time (ms)"):
        assert row in printed, row
    support = re.search(r"support per row \(min / max\)\s+(\d+) / (\d+)", printed)
    assert 1 <= int(support.group(1)) <= int(support.group(2)) <= 80
    sparsity = float(re.search(r"block sparsity \(64x64 tiles\)\s+([0-9.]+)", printed).group(1))
    assert 0.0 <= sparsity < 1.0
    assert "check: PASS" in printed


def test_demo_exits_non_zero_when_entmax_is_wrong(capsys, monkeypatch):
    exact = cli.api.entmax_attention

    def perturbed(*args, **kwargs):
        result = exact(*args, **kwargs)
        if kwargs.get("return_aux"):
            return result[0] * 1.01, result[1]
        return result * 1.01

    monkeypatch.setattr(cli.api, "entmax_attention", perturbed)
    assert cli.main(TINY + ["--no-causal"]) == 1
    assert "check: FAIL" in capsys.readouterr().out


def test_block_sparsity_counts_tiles_holding_non_zeros():
    probs = torch.zeros(1, 1, 130, 130, dtype=torch.float64)
    probs[0, 0, 5, 3] = 0.5          # tile (0, 0)
    probs[0, 0, 129, 70] = 0.25      # tile (2, 1)
    assert abs(cli.block_sparsity(probs, causal=False) - (1 - 2 / 9)) < 1e-12
    assert abs(cli.block_sparsity(probs, causal=True) - (1 - 2 / 6)) < 1e-12


def test_structured_inputs_make_attention_local():
    q, k, _ = cli.build_inputs(1, 2, 256, 16, torch.float64, torch.device("cpu"), seed=5)
    scores = q @ k.transpose(-1, -2)
    near = torch.diagonal(scores, dim1=-2, dim2=-1)[..., cli.SINK_KEYS:].mean()
    far = scores[..., 200:, cli.SINK_KEYS:100].mean()
    assert near > far + 1.0
