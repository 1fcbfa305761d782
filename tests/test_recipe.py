"""The length-generalization recipe (recipes/): task generators, and the tiny configuration end to end on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from recipes.model import ATTENTION_TYPES, Decoder, ModelConfig  # noqa: E402
from recipes.tasks import IGNORE_INDEX, FlipFlopTask, MQARTask  # noqa: E402


def test_mqar_answers_are_the_values_paired_with_the_queried_keys():
    task = MQARTask(num_keys=16, num_values=16, num_noise=8, pairs=6, queries=4)
    inputs, targets = task.sample(32, 96, torch.Generator().manual_seed(3))
    assert inputs.shape == targets.shape == (32, 96)
    for row_inputs, row_targets in zip(inputs.tolist(), targets.tolist()):
        pairs = dict(zip(row_inputs[0:12:2], row_inputs[1:12:2]))
        assert len(pairs) == 6  # distinct keys
        answered = [(i, t) for i, t in enumerate(row_targets) if t != IGNORE_INDEX]
        assert len(answered) == 4
        for position, target in answered:
            assert pairs[row_inputs[position]] == target == row_inputs[position + 1]
        noise = [token for token in row_inputs[12:] if token < task.num_noise]
        assert len(noise) == 96 - 12 - 8


def test_flipflop_reads_return_the_last_written_bit():
    task = FlipFlopTask(write_probability=0.2, read_probability=0.3)
    inputs, targets = task.sample(16, 200, torch.Generator().manual_seed(5))
    reads = 0
    for row_inputs, row_targets in zip(inputs.tolist(), targets.tolist()):
        last_written = None
        for step in range(100):
            instruction, bit = row_inputs[2 * step], row_inputs[2 * step + 1]
            if instruction == task.WRITE:
                last_written = bit
            if instruction == task.READ:
                reads += 1
                assert row_targets[2 * step] == bit == last_written
            else:
                assert row_targets[2 * step] == IGNORE_INDEX
            assert row_targets[2 * step + 1] == IGNORE_INDEX
    assert reads > 100


def test_bad_task_and_model_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="queries"):
        MQARTask(pairs=4, queries=5)
    with pytest.raises(ValueError, match="at least"):
        MQARTask(pairs=8, queries=8).sample(2, 20, torch.Generator())
    with pytest.raises(ValueError, match="even"):
        FlipFlopTask().sample(2, 33, torch.Generator())
    with pytest.raises(ValueError, match="attention"):
        ModelConfig(vocab_size=10, attention="linear")


def test_every_attention_type_is_causal():
    """Changing a later token must not change earlier logits, for every attention type (RoPE on)."""
    tokens = torch.randint(20, (2, 24), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, 15:] = (changed[:, 15:] + 1) % 20
    for attention in ATTENTION_TYPES:
        torch.manual_seed(0)
        model = Decoder(ModelConfig(vocab_size=20, d_model=32, num_heads=2, num_layers=1, attention=attention))
        with torch.no_grad():
            before, after = model(tokens), model(changed)
        assert torch.allclose(before[:, :15], after[:, :15], atol=1e-5), attention
        assert not torch.allclose(before[:, 15:], after[:, 15:], atol=1e-5), attention


def test_tiny_config_end_to_end(tmp_path):
    out = tmp_path / "recipe"
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)]))
    completed = subprocess.run([sys.executable, "-m", "recipes.length_generalization", "--config", "tiny",
                                "--out", str(out)], cwd=REPO_ROOT, env=environment, capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]

    document = json.loads((out / "results.json").read_text())
    assert {"config", "environment", "runs", "throughput", "summary"} <= set(document)
    tasks = {"mqar": [32, 64, 128], "flipflop": [32, 64, 128], "stdlib_lm": [32, 64]}
    assert len(document["runs"]) == len(tasks) * len(ATTENTION_TYPES)
    for run in document["runs"]:
        assert run["loss_end"] < run["loss_start"], run
        assert run["steps_done"] == run["steps_planned"]
        assert run["train_tokens_per_s"] > 0
        assert [int(length) for length in run["eval"]] == tasks[run["task"]]
        for value in run["eval"].values():
            assert (0 <= value <= 1) if run["metric"] == "accuracy" else (1 < value < 257)
        state = torch.load(run["checkpoint"])["state_dict"]
        assert "embedding.weight" in state
    for task, lengths in tasks.items():
        per_attention = document["summary"][task]["attention"]
        assert set(per_attention) == set(ATTENTION_TYPES)
        for entry in per_attention.values():
            assert [int(length) for length in entry["eval"]] == lengths
            assert {"mean", "min", "max", "std", "seeds"} <= set(entry["eval"][str(lengths[0])])
    assert {row["attention"] for row in document["throughput"]} == set(ATTENTION_TYPES)
    learned = [run["attention_parameters"] for run in document["runs"] if run["attention"] == "learnable"]
    assert all(1 < alpha <= 2 for values in learned for alpha in values["layer0.alpha"])

    plot = out / "length_generalization.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_backend_check_runs_one_case_on_request(capsys):
    """recipes.backend_check --case I runs case I alone (run_gpu.sh starts one process per case); on the CPU the
    fused backend runs through the Triton interpreter and must match the exact one."""
    from recipes import backend_check

    assert backend_check.main(["--count"]) == 0
    count = int(capsys.readouterr().out)
    assert count == backend_check.CASE_COUNT == 4
    assert backend_check.main(["--device", "cpu", "--case", "1"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    report = lines[-1]
    assert report["ok"] and len(report["cases"]) == 1
    assert report["cases"][0]["alpha"] == "tensor (H,)" and report["cases"][0]["shape"] == [4, 4, 64, 32]
    with pytest.raises(SystemExit):
        backend_check.main(["--case", str(count)])
