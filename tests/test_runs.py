"""runs.py: what a resumed run may change, and which checkpoints --keep-last keeps (end to end in test_train.py)."""
import argparse
from contextlib import ExitStack

from runs import changed_args, claim_experiment, prune_checkpoints


def test_changed_flags_are_sorted_into_fixed_free_and_other():
    saved = {"model": "DiT-XL/2", "max_steps": 100, "lr": 1e-4, "init_from": None, "resume": None, "vae": "ema",
             "feature_path": None}
    now = argparse.Namespace(model="DiT-L/2", max_steps=200, lr=1e-3, init_from="a.pt", resume="auto", vae="mse",
                             feature_path=None, unknown_to_the_checkpoint=1)
    fixed, free, other = changed_args(saved, now)
    assert fixed == ["--init-from None -> a.pt", "--model DiT-XL/2 -> DiT-L/2", "--vae ema -> mse"]
    assert free == ["--max-steps 100 -> 200"] and other == ["--lr 0.0001 -> 0.001"]
    now.feature_path = "features/"  # with latents, their meta.json decides the VAE
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
    args = argparse.Namespace(results_dir=str(tmp_path / "results"), model="DiT-Nano/4")
    with ExitStack() as scope:  # from step 1800 (say, to retry a loss spike with another lr): a new folder
        folder, notes = claim_experiment(args, run / "checkpoints" / "0001800.pt", scope)
        assert folder == tmp_path / "results" / "001-DiT-Nano-4"
        assert notes[0].startswith(f"Branching from {run / 'checkpoints' / '0001800.pt'}: its run went on to "
                                   "0002400.pt")
    assert (run / "metrics.jsonl").read_text() == '{"step": 2400}\n'  # the first run's records stay whole
    with ExitStack() as scope:  # from its newest checkpoint, a run continues in its own folder
        assert claim_experiment(args, run / "checkpoints" / "0002400.pt", scope) == (run, [])
