"""Every bench script in its tiny --smoke mode, so none of them can rot (real figures: make bench)."""
import pytest
from helpers import run_script


@pytest.mark.parametrize("script, heading", [
    ("bench.peak", "| shape | dtype | GFLOP/s | vs fp32 |"),
    ("bench.model_speed", "| model | pass | batch | seconds | images/s | GFLOP/s | of peak |"),
    pytest.param("bench.evaluate_memory", "| images | uint8 pixels MB | peak RSS MB | growth MB |",
                 marks=pytest.mark.slow),
    # These three time torch.compile or a VAE: minutes on a small CPU, so make test-all runs them.
    pytest.param("bench.switches",
                 "| switch | step seconds | speed vs eager fp32 | step memory MB | memory vs eager fp32 |",
                 marks=pytest.mark.slow),
    pytest.param("bench.train_e2e", "| input | images/s | vs on-the-fly VAE |", marks=pytest.mark.slow),
    pytest.param("bench.sample_speed", "| sampler | steps | mode | s/step | s/image (full run) | speed vs eager |",
                 marks=pytest.mark.slow),
])
def test_bench_script_smoke(script, heading):
    result = run_script(script, "--smoke", timeout=900)
    assert heading in result.stdout
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(table) >= 3 and all("nan" not in line for line in table)


def test_design_table_prices_cross_attention():
    result = run_script("bench.model_table", "--designs", "--markdown")
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| DiT-")]
    assert [row[1].strip() for row in rows[:4]] == ["adaln-zero", "adaln", "cross-attention", "in-context"]
    assert rows[2][0].strip() == "DiT-S/2" and rows[2][4].strip() == "+15.0%"  # cross-attention's extra cost at S/2
    assert [row[5].strip() for row in rows if row[0].strip() == "DiT-XL/2"] == ["118.6", "118.6", "137.6", "119.4"]
