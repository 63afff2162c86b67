"""Routing and interference analysis of Mixture-of-Memories models (notebooks stay thin).

* ``routing``: per-token assignment and weights (heatmap data), load, router entropy, MQAR token roles
  and where each role goes, co-selection of memories for top-k > 1.
* ``runs``: metrics.jsonl of a run (load per memory and entropy over training); ``train_or_load``.
* ``capacity``: write N random associations into a memory of any rule and read them back: recall
  curves for a single memory, a routed mixture and an expanded single memory; cross-talk.
* ``memories``: trained models: final memory states, their similarity and effective rank, which memory
  answered each MQAR query, memory ablation.
* ``plots``: figures of all of the above (matplotlib / seaborn imported when called).
* ``sweeps``: an Optuna study as records and figures.

Definitions: docs/analysis.md. Only torch and numpy are imported here.
"""

from __future__ import annotations

from momkit.analysis.capacity import (
    IDEAL_GATES,
    Associations,
    capacity_at,
    capacity_curve,
    compare_capacity,
    crosstalk,
    crosstalk_summary,
    ideal_gates,
    make_associations,
    recall_metrics,
    route,
    token_table_router,
    write_and_read,
)
from momkit.analysis.memories import (
    ablate_memory,
    ablation_effect,
    effective_rank,
    memory_names,
    memory_states,
    mom_layers,
    query_report,
    recall_by_memory,
    state_similarity,
    state_table,
    token_routing_table,
)
from momkit.analysis.routing import (
    FILLER,
    KEY,
    QUERY,
    ROLES,
    VALUE,
    assignment,
    coselection,
    heatmap,
    load,
    model_plans,
    mqar_roles,
    mutual_information,
    role_assignment,
    router_entropy,
)
from momkit.analysis.runs import load_entropy, load_history, metric_series, read_metrics, run_is_complete, train_or_load

__all__ = [
    "FILLER", "IDEAL_GATES", "KEY", "QUERY", "ROLES", "VALUE", "Associations", "ablate_memory", "ablation_effect",
    "assignment", "capacity_at", "capacity_curve", "compare_capacity", "coselection", "crosstalk",
    "crosstalk_summary", "effective_rank", "heatmap", "ideal_gates", "load", "load_entropy", "load_history",
    "make_associations", "memory_names", "memory_states", "metric_series", "model_plans", "mom_layers",
    "mqar_roles", "mutual_information", "query_report", "read_metrics", "recall_by_memory", "recall_metrics",
    "role_assignment", "route", "router_entropy", "run_is_complete", "state_similarity", "state_table",
    "token_routing_table", "token_table_router", "train_or_load", "write_and_read",
]
