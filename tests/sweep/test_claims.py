"""Workers on one SQLite file claim each queued trial exactly once (momkit.sweep.storage.claim_lock): several
processes race to claim many trials at once, and no trial is claimed twice or left behind."""

from __future__ import annotations

import multiprocessing as mp

import optuna


def _claimer(url: str, study_name: str, start, out) -> None:
    from momkit.sweep.runner import _claim
    from momkit.sweep.storage import claim_lock, open_storage

    storage = open_storage(url)
    study_id = storage.get_study_id_from_name(study_name)
    start.wait()
    got = []
    while True:
        with claim_lock(url):
            claimed = _claim(storage, study_id)
        if claimed is None:
            break
        got.append(claimed[1].number)
    out.put(got)


def test_concurrent_workers_claim_each_trial_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'sweeps.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="race", storage=url)
    for _ in range(40):
        study.enqueue_trial({})
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(url, "race", start, out)) for _ in range(4)]
    for p in procs:
        p.start()
    start.set()
    claimed = [n for _ in procs for n in out.get(timeout=120)]
    for p in procs:
        p.join(timeout=60)
    assert sorted(claimed) == list(range(40)), "every trial claimed exactly once"
