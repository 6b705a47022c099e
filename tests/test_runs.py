"""ditlib/runs.py: what a resumed run may change, which checkpoints --keep-last keeps, where a run writes,
whether the ranks agree (end to end in test_train.py)."""
from contextlib import ExitStack

from helpers import ROOT, run_script

from ditlib.runs import changed_args, claim_experiment, prune_checkpoints


def test_changed_flags_are_sorted_into_fixed_free_and_other():
    saved = {"model": "DiT-XL/2", "max_steps": 100, "lr": 1e-4, "init_from": None, "resume": None, "vae": "ema",
             "feature_path": None}
    now = dict(model="DiT-L/2", max_steps=200, lr=1e-3, init_from="a.pt", resume="auto", vae="mse",
               feature_path=None, unknown_to_the_checkpoint=1)
    fixed, free, other = changed_args(saved, now)
    assert fixed == ["--init-from None -> a.pt", "--model DiT-XL/2 -> DiT-L/2", "--vae ema -> mse"]
    assert free == ["--max-steps 100 -> 200"] and other == ["--lr 0.0001 -> 0.001"]
    now["feature_path"] = "features/"  # with latents, their meta.json decides the VAE
    assert "--vae ema -> mse" not in changed_args({**saved, "feature_path": "features/"}, now)[0]


def test_keep_last_keeps_the_newest_every_mth_and_the_one_resumed_from(tmp_path):
    for step in range(1, 8):
        (tmp_path / f"{step:07d}.pt").write_bytes(b"x")
    removed = prune_checkpoints(tmp_path, keep_last=2, keep_every=3, keep=tmp_path / "0000001.pt")
    assert sorted(p.name for p in removed) == ["0000002.pt", "0000004.pt", "0000005.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000001.pt", "0000003.pt", "0000006.pt", "0000007.pt"]


def test_resuming_an_earlier_checkpoint_branches_into_a_new_folder(tmp_path):
    run = tmp_path / "results" / "000-DiT-Nano-4"
    (run / "checkpoints").mkdir(parents=True)
    for step in (600, 1800, 2400):
        (run / "checkpoints" / f"{step:07d}.pt").write_bytes(b"x")
    (run / "metrics.jsonl").write_text('{"step": 2400}\n')
    results = str(tmp_path / "results")
    with ExitStack() as scope:  # from step 1800 (say, to retry a loss spike with another lr): a new folder
        folder, notes = claim_experiment(results, "DiT-Nano/4", run / "checkpoints" / "0001800.pt", scope)
        assert folder == tmp_path / "results" / "001-DiT-Nano-4"
        assert notes[0].startswith(f"Branching from {run / 'checkpoints' / '0001800.pt'}: its run went on to "
                                   "0002400.pt")
    assert (run / "metrics.jsonl").read_text() == '{"step": 2400}\n'  # the first run's records stay whole
    with ExitStack() as scope:  # from its newest checkpoint, a run continues in its own folder
        assert claim_experiment(results, "DiT-Nano/4", run / "checkpoints" / "0002400.pt", scope) == (run, [])


RANK_CHECK_WORKER = """
import torch
import torch.distributed as dist
from models import DiT
from ditlib.runs import check_ranks_agree

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)  # the same weights on both ranks
model = DiT(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=2)
ema = DiT(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=2)
ema.load_state_dict(model.state_dict())
check_ranks_agree({"model": model, "EMA": ema}, 5)
print(f"rank {rank}: agree")
if rank == 1:
    with torch.no_grad():
        ema.blocks[0].mlp.fc2.weight[0, 0] += 1e-6
try:
    check_ranks_agree({"model": model, "EMA": ema}, 6)
except RuntimeError as error:
    print(f"rank {rank}: {error}")
dist.destroy_process_group()
"""


def test_rank_agreement_check_covers_the_ema(tmp_path):
    (tmp_path / "worker.py").write_text(RANK_CHECK_WORKER)
    result = run_script(tmp_path / "worker.py", nproc=2, env={"PYTHONPATH": str(ROOT)})
    for rank in (0, 1):
        assert f"rank {rank}: agree" in result.stdout
        assert (f"rank {rank}: the ranks' EMA weights differ at step 6" in result.stdout), result.stdout
