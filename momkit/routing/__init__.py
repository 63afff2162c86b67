"""Routing: router strategies (a registry), the routing plan, dispatch / combine, losses, telemetry."""

from __future__ import annotations

from momkit.routing.dispatch import Dispatch
from momkit.routing.losses import BalanceStats, load_balancing_loss, z_loss
from momkit.routing.plan import RoutingPlan, RoutingStats
from momkit.routing.routers import ROUTER_WEIGHTS, Dense, Hash, RoundRobin, Router, TopKSigmoid, TopKSoftmax

_ROUTERS: dict[str, type[Router]] = {}


def register_router(cls: type[Router]) -> type[Router]:
    if cls.name in _ROUTERS and _ROUTERS[cls.name] is not cls:
        raise ValueError(f"a router named {cls.name!r} is already registered")
    _ROUTERS[cls.name] = cls
    return cls


def get_router(name: str) -> type[Router]:
    try:
        return _ROUTERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown router {name!r}; valid routers: {', '.join(router_names())}") from None


def router_names() -> list[str]:
    return sorted(_ROUTERS)


for _cls in (TopKSoftmax, TopKSigmoid, Dense, RoundRobin, Hash):
    register_router(_cls)

__all__ = ["ROUTER_WEIGHTS", "BalanceStats", "Dispatch", "Router", "RoutingPlan", "RoutingStats", "get_router",
           "load_balancing_loss", "register_router", "router_names", "z_loss"]
