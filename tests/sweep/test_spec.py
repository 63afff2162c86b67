"""Sweep specs: the shipped ones load; bad ones raise one ConfigError naming the key, the value and what is allowed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from momkit.config import ConfigError
from momkit.sweep import load_spec

ROOT = Path(__file__).resolve().parents[2]


def test_demo_grid_is_every_valid_combination():
    spec = load_spec(ROOT / "sweeps" / "demo.yaml")
    points = {(p["model.mom.num_memories"], p["model.mom.topk"], p["model.mom.shared_memory"]) for p in spec.grid}
    expected = {(m, k, s) for m in (1, 2, 4) for k in (1, 2) for s in (True, False) if k <= m}
    assert points == expected and len(spec.grid) == 10  # topk=2 with one memory is left out, not failed
    assert spec.n_trials() == 10
    cfg = spec.trial_config("demo", 3, spec.grid[0], seed=0)
    assert cfg.run.dir == "runs/sweeps/demo/trial-0003/seed-0" and cfg.run.progress is False
    assert cfg.model.mom.num_memories == spec.grid[0]["model.mom.num_memories"]
    assert cfg.optim.max_steps == 150 and cfg.model.vocab_size == 32


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml")))
def test_shipped_specs_load(name):
    spec = load_spec(ROOT / "sweeps" / f"{name}.yaml")
    assert spec.study == name and spec.grid
    for point in spec.grid[::7]:  # grid points are valid configs through load_config too (a sample of them)
        spec.trial_config(name, 0, point, seed=spec.seeds[0])


def _capacity_cells(name):
    """(grid point, trial config) of every point of sweeps/<name>.yaml."""
    spec = load_spec(ROOT / "sweeps" / f"{name}.yaml")
    assert spec.study == name and len(spec.seeds) >= 3 and spec.is_grid and spec.pruner.name == "none"
    assert spec.objective.metric == "valid/accuracy/seq_len=128,num_kv_pairs=32"
    return [(p, spec.trial_config(name, 0, p, seed=0)) for p in spec.grid]


def _state(cfg):
    """The memory state of one layer: memories x heads x key dim x value dim."""
    mom = cfg.model.resolved_mom()
    memories = 1 if cfg.model.mixer == "single" else mom.num_memories + mom.shared_memory
    return memories * mom.key_dim * mom.value_dim * mom.num_heads


def test_capacity_protocol_specs_are_the_protocol():
    from momkit.routing import get_router

    cells = {name: _capacity_cells(name) for name in ("capacity_state", "capacity_routing", "capacity_memories",
                                                      "capacity_aux")}
    for name, points in cells.items():
        for _, cfg in points:  # zoology's data settings, one memory's capacity binding
            assert cfg.optim.data_order == "in_order" and cfg.task["random_non_queries"] is True
            assert cfg.model.resolved_mom().key_dim in (16, 64, 80)
        lrs = {}
        for p, _ in points:
            lrs.setdefault(tuple((k, str(v)) for k, v in p.items() if k != "optim.lr"), set()).add(p["optim.lr"])
        assert all(len(v) >= 3 for v in lrs.values()), f"{name}: a learning-rate grid in every cell"
    # claims (1)-(3), three rules: single, expanded to the mixture's total state, MoM M4 top-2 with and without
    state = {(p["layout"], cfg.model.mom.rule): cfg for p, cfg in cells["capacity_state"]}
    assert {r for _, r in state} == {"gated_deltanet", "gla", "linear_attn"}
    for rule in ("gated_deltanet", "gla", "linear_attn"):
        single, mom, mom_shared = state["single", rule], state["mom4_top2", rule], state["mom4_top2_shared", rule]
        assert single.model.mixer == "single" and _state(single) == _state(mom_shared) // 5
        assert (mom.model.mom.num_memories, mom.model.mom.topk, mom.model.mom.shared_memory) == (4, 2, False)
        assert mom_shared.model.mom.shared_memory and mom_shared.model.mom.num_memories == 4
        assert _state(state["single_x4", rule]) == _state(mom)
        assert _state(state["single_x5", rule]) == _state(mom_shared)
    # controls: a non-learned router at the same M / top-k; top-1 with and without task gradient to the router
    routing = {p["layout"]: cfg.model.mom for p, cfg in cells["capacity_routing"]}
    assert any(not get_router(m.router).learned and (m.num_memories, m.topk) == (4, 2) for m in routing.values())
    assert {(m.topk, m.router_weights) for m in routing.values() if m.router == "topk_softmax"} == {
        (2, "renormalized"), (1, "renormalized"), (1, "unnormalized")}
    assert {cfg.model.mom.num_memories for _, cfg in cells["capacity_memories"]} == {1, 2, 4, 8}
    assert {cfg.model.mom.aux_loss_scale for _, cfg in cells["capacity_aux"]} == {0.0, 1e-3, 1e-2}


def test_capacity_pilot_is_the_state_protocol_shortened():
    """The pilot's cells are capacity_state's gated_deltanet cells for claims (1)-(3) (all but single_x4), with the
    same learning rates and seeds; only the number of steps (and the evaluation interval) changed."""
    pilot = {(p["layout"], p["optim.lr"]): cfg for p, cfg in _capacity_cells("capacity_pilot")}
    state = {(p["layout"], p["optim.lr"]): cfg for p, cfg in _capacity_cells("capacity_state")
             if cfg.model.mom.rule == "gated_deltanet"}
    assert {layout for layout, _ in pilot} == {"single", "single_x5", "mom4_top2", "mom4_top2_shared"}
    assert pilot.keys() == {key for key in state if key[0] != "single_x4"}
    for key, cfg in pilot.items():
        full = state[key]
        assert cfg.optim.max_steps == 1000 < full.optim.max_steps
        assert cfg.model == full.model and cfg.task == full.task
        assert dataclasses.replace(cfg.optim, max_steps=full.optim.max_steps) == full.optim


def test_capacity_controls_reuse_capacity_state_and_change_only_what_they_control():
    """capacity_long: capacity_state's gated_deltanet and gla mixtures with the shared memory trained 3x as long,
    against the expanded memories; capacity_lr_edge: their mixtures and expanded memories on the learning-rate
    grid widened by 3e-2; capacity_lr_low: the expanded memories on the grid widened by 3e-4. Every other cell is
    capacity_state's own resolved config (a storage holding capacity_state reuses its seeds), and a new cell
    differs from capacity_state's only in what it controls."""
    from momkit.sweep.seeds import config_key

    state = {(p["layout"], cfg.model.mom.rule, p["optim.lr"]): cfg for p, cfg in _capacity_cells("capacity_state")}
    keys = {config_key(cfg) for cfg in state.values()}
    long = {(p["layout"], cfg.model.mom.rule, p["optim.lr"]): cfg for p, cfg in _capacity_cells("capacity_long")}
    assert {(layout, rule) for layout, rule, _ in long} == {
        (layout, rule) for layout in ("single_x4", "single_x5", "mom4_top2_shared_12k")
        for rule in ("gated_deltanet", "gla")}
    for (layout, rule, lr), cfg in long.items():
        if layout == "mom4_top2_shared_12k":
            full = state["mom4_top2_shared", rule, lr]
            assert config_key(cfg) not in keys and cfg.optim.max_steps == 3 * full.optim.max_steps
            assert cfg.model == full.model and cfg.task == full.task
            assert dataclasses.replace(cfg.optim, max_steps=full.optim.max_steps) == full.optim
        else:
            assert config_key(cfg) == config_key(state[layout, rule, lr])
    edge = _capacity_cells("capacity_lr_edge")
    assert {p["optim.lr"] for p, _ in edge} == {1e-3, 3e-3, 1e-2, 3e-2}
    for p, cfg in edge:
        if p["optim.lr"] < 3e-2:
            assert config_key(cfg) == config_key(state[p["layout"], cfg.model.mom.rule, p["optim.lr"]])
        else:
            full = state[p["layout"], cfg.model.mom.rule, 1e-2]
            assert config_key(cfg) not in keys and cfg.model == full.model and cfg.task == full.task
            assert dataclasses.replace(cfg.optim, lr=full.optim.lr) == full.optim
    low = _capacity_cells("capacity_lr_low")
    assert {p["layout"] for p, _ in low} == {"single_x4", "single_x5"}
    assert {p["optim.lr"] for p, _ in low} == {3e-4, 1e-3, 3e-3, 1e-2}
    for p, cfg in low:
        if p["optim.lr"] > 3e-4:
            assert config_key(cfg) == config_key(state[p["layout"], cfg.model.mom.rule, p["optim.lr"]])
        else:
            full = state[p["layout"], cfg.model.mom.rule, 1e-3]
            assert config_key(cfg) not in keys and cfg.model == full.model and cfg.task == full.task
            assert dataclasses.replace(cfg.optim, lr=full.optim.lr) == full.optim


def test_mqar_memories_is_the_papers_ablation():
    spec = load_spec(ROOT / "sweeps" / "mqar_memories.yaml")
    cells = {(p["model.mom.num_memories"], p["model.mom.topk"], p["model.mom.shared_memory"], p["model.mom.rule"])
             for p in spec.grid}
    assert {c[0] for c in cells} == {1, 2, 4, 8}
    assert {c[3] for c in cells} == {"gated_deltanet", "gla", "linear_attn"}
    assert {c[2] for c in cells} == {True, False}
    assert len({p["optim.lr"] for p in spec.grid}) >= 3  # a learning-rate search in every cell


def test_routers_spec_covers_every_router(tmp_path):
    from momkit.routing import router_names

    spec = load_spec(ROOT / "sweeps" / "routers.yaml")
    routers = {spec.trial_config("r", 0, p, 0).model.mom.router for p in spec.grid}
    assert routers == set(router_names())
    dense = [p for p in spec.grid if spec.trial_config("r", 0, p, 0).model.mom.router == "dense"]
    assert all(spec.trial_config("r", 0, p, 0).model.mom.topk == 4 for p in dense)  # a bundle sets both keys


def test_sampled_space_types(tmp_path, make_spec):
    spec = load_spec(make_spec(tmp_path / "s.yaml", space={
        "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "model.num_layers": {"type": "int", "low": 1, "high": 3},
        "model.mom.rule": ["gated_deltanet", "gla"],
    }, sampler={"name": "tpe", "seed": 3}, budget={"trials": 5}, seeds=[0, 7]))
    assert spec.grid is None and spec.n_trials() == 5 and spec.n_trials(9) == 9 and spec.seeds == [0, 7]
    assert [spec.space[k].type for k in spec.space] == ["float", "int", "categorical"]
    cfg = spec.trial_config("s", 1, {"optim.lr": 3e-3, "model.num_layers": 3, "model.mom.rule": "gla"}, seed=7)
    assert (cfg.optim.lr, cfg.model.num_layers, cfg.model.mom.rule, cfg.run.seed) == (3e-3, 3, "gla", 7)


def test_every_registered_rule_is_a_sweep_value(tmp_path, make_spec):
    """The rule values a spec accepts are the registry's (the paper's Table 1 rules among them)."""
    from momkit.rules import rule_names

    spec = load_spec(make_spec(tmp_path / "s.yaml", space={"model.mom.rule": rule_names()}))
    assert {"lightning", "hgrn2", "ttt"} <= set(rule_names())
    assert {spec.trial_config("s", 0, p, 0).model.mom.rule for p in spec.grid} == set(rule_names())


BAD = [
    ({"spcae": {}}, r"unknown key 'spcae'; did you mean 'space'\?"),
    ({"space": {"model.mom.num_memory": [1, 2]}},
     r"space.model.mom.num_memory: value 1: unknown key 'model.mom.num_memory'; did you mean 'model.mom.num_memories'"),
    ({"space": {"task.seq_len": [8, 16]}}, r"space.task.seq_len: value 8 is invalid in every combination.*unknown key"),
    ({"space": {"model.mom.num_memories": ["many"]}}, r"space.model.mom.num_memories: value 'many'.*Integer"),
    ({"space": {"model.mom.num_memories": [1, 2], "model.mom.capacity_factor": [-1.0, 2.0]}},
     r"space.model.mom.capacity_factor: value -1.0 is invalid in every combination.*must be None or > 0"),
    ({"space": {"model.mom.num_memories": [1, 2], "model.mom.router": ["dense"]},
      "overrides": {"model.mom.topk": 3}},
     r"space.model.mom.num_memories: value 1 is invalid in every combination.*topk=3 is invalid: must be <= "
     r"num_memories=1"),
    ({"space": {"optim.lr": {"type": "float", "low": 1e-2, "high": 1e-3}}, "sampler": {"name": "random"},
      "budget": {"trials": 2}}, r"space.optim.lr: low=0.01, high=0.001 is not a range"),
    ({"space": {"optim.lr": {"type": "float", "low": 0.0, "high": 1e-3, "log": True}}, "sampler": {"name": "random"},
      "budget": {"trials": 2}}, r"space.optim.lr.low=0.0 is invalid: a log range needs low > 0"),
    ({"space": {"model.num_layers": {"type": "int", "low": 1.5, "high": 3}}, "sampler": {"name": "random"},
      "budget": {"trials": 2}}, r"space.model.num_layers.low=1.5 is invalid: must be an int"),
    ({"space": {"optim.lr": {"type": "choice", "values": [1]}}}, r"space.optim.lr.type='choice' is invalid: one of"),
    ({"space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}},
     r"space.optim.lr: a float range cannot be enumerated by the grid sampler"),
    ({"space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "lgo": True}}, "sampler": {"name": "tpe"},
      "budget": {"trials": 3}}, r"unknown key 'space.optim.lr.lgo'; did you mean .*\(valid keys of space.optim.lr: "
     r"type, low, high, step, log\) for type float"),
    ({"objective": {"metric": "valid/acc"}}, r"objective.metric='valid/acc' is invalid: one of valid/accuracy"),
    ({"objective": {"direction": "up"}}, r"objective.direction='up' is invalid: one of maximize, minimize"),
    ({"objective": {"from": "last"}}, r"objective.from='last' is invalid: best .* or final"),
    ({"sampler": {"name": "bayes"}}, r"sampler.name='bayes' is invalid: one of tpe, random, grid"),
    ({"sampler": {"name": "tpe"}}, r"budget.trials is required for sampler 'tpe'"),
    ({"pruner": {"name": "median", "warmup": 3}}, r"unknown key 'pruner.warmup'; did you mean 'pruner.warmup_steps'"),
    ({"pruner": {"name": "median"}, "objective": {"metric": "elapsed_s", "direction": "minimize"}},
     r"pruner.name='median' is invalid with objective.metric='elapsed_s'"),
    ({"budget": {"trials": 3}}, r"budget.trials=3 is invalid: the grid has 2 valid points"),
    ({"budget": {"trials": 0}}, r"budget.trials=0 is invalid"),
    ({"seeds": 0}, r"seeds=0 is invalid"),
    ({"space": {"run.seed": [0, 1]}}, r"run.seed is set for every trial by the sweep; use the spec's 'seeds'"),
    ({"overrides": {"run.dir": "x"}}, r"run.dir is set for every trial by the sweep; use the spec's 'runs_dir'"),
    ({"overrides": {"model.mom.num_memories": 2}}, r"model.mom.num_memories is both in overrides and in space"),
    ({"heartbeat": {"interval": 5, "grace_period": 5}}, r"heartbeat.grace_period=5 is invalid: must exceed"),
    ({"base": "no_such_config"}, r"base: config 'no_such_config' is neither a packaged config"),
    ({"study": "a/b"}, r"study='a/b' is invalid"),
    ({"space": {"router": {"type": "bundle", "values": {"dense": {"model.mom.routr": "dense"}}}}},
     r"space.router: value 'dense': unknown key 'model.mom.routr'; did you mean 'model.mom.router'"),
]


@pytest.mark.parametrize(("sections", "message"), BAD, ids=[m[:40] for _, m in BAD])
def test_bad_specs_name_the_key_the_value_and_what_is_allowed(tmp_path, make_spec, sections, message):
    path = make_spec(tmp_path / "bad.yaml", **sections)
    with pytest.raises(ConfigError, match=message) as info:
        load_spec(path)
    assert str(info.value).startswith(f"sweep spec {path}:") and "\n" not in str(info.value)


def test_the_example_spec_in_the_docs_loads(tmp_path):
    text = (ROOT / "docs" / "sweeps.md").read_text()
    example = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "example.yaml").write_text(example)
    spec = load_spec(tmp_path / "example.yaml")
    assert spec.study == "mqar_lr" and list(spec.space) == ["layout", "model.mom.shared_memory", "optim.lr",
                                                          "model.num_layers", "optim.batch_size"]
    params = {"layout": "single", "model.mom.shared_memory": False, "optim.lr": 1e-3, "model.num_layers": 1,
              "optim.batch_size": 32}
    assert spec.trial_config("mqar_lr", 0, params, seed=0).model.mixer == "single"
    assert spec.claims == [{"claim": "MoM beats one memory", "better": {"layout": "mom4_top2"},
                            "than": {"layout": "single"}, "per": ["model.mom.shared_memory"]}]
    assert "claims" not in spec.fingerprint()  # editing claims does not make a new experiment


def test_exponents_without_a_dot_are_numbers(tmp_path):
    (tmp_path / "e.yaml").write_text("base: mqar_tiny\nspace:\n  optim.lr: {type: float, low: 1e-4, high: 3E-2, "
                                     "log: true}\n  optim.weight_decay: [0, 1e-2]\nsampler: {name: random}\n"
                                     "budget: {trials: 2}\n")
    spec = load_spec(tmp_path / "e.yaml")
    assert (spec.space["optim.lr"].low, spec.space["optim.lr"].high) == (1e-4, 3e-2)
    assert spec.space["optim.weight_decay"].values == [0, 0.01]


def test_missing_and_unparsable_specs(tmp_path):
    with pytest.raises(ConfigError, match=r"sweep spec '.*nope.yaml' does not exist"):
        load_spec(tmp_path / "nope.yaml")
    (tmp_path / "broken.yaml").write_text("space: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_spec(tmp_path / "broken.yaml")


def test_base_path_is_relative_to_the_spec(tmp_path, make_spec):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mine.yaml").write_text("model:\n  mom: {topk: 1}\noptim:\n  lr: 0.005\n")
    spec = load_spec(make_spec(tmp_path / "s.yaml", base="configs/mine.yaml"))
    cfg = spec.trial_config("s", 0, spec.grid[0], seed=0)
    assert cfg.optim.lr == 0.005 and spec.fingerprint()["base"] == "configs/mine.yaml"
