"""The load tests' scenarios as plans of stages, in multiples of the service's capacity.

Capacity: answers per second the service completes at saturation for the mix of
load_tests/traffic.py, measured by the `capacity` scenario (a closed loop: a fixed
number of clients that send again as soon as they are answered) or given. The other
scenarios are open loops: clients send at a target rate whatever the answers take
(the locustfile adds clients while answers are slow, to keep the rate).

No locust here (see traffic.py); the locustfile's shape class follows these plans.
"""

from dataclasses import dataclass

STEADY = 0.8  # of capacity
BURST = 3.0
OVERLOAD = 10.0
SOAK = 0.8
# During the disconnect storm, clients that stay check that the service keeps drawing.
STORM_STAYING = 0.3


@dataclass(frozen=True)
class Stage:
    """One stage of a plan, which lasts until `until_s` from the scenario's start.

    Args:
        until_s: when it ends.
        rate_rps: open-loop clients' target rate of requests.
        closed_users: closed-loop clients (the capacity measurement).
        leavers: clients that leave at random points, at the same time (the storm).
    """

    until_s: float
    rate_rps: float = 0.0
    closed_users: int = 0
    leavers: int = 0


SCENARIOS = ("capacity", "steady", "burst", "overload", "storm", "soak")
# Seconds each lasts unless told; the storm's longest: it ends once its clients have left.
DEFAULT_DURATION_S = {
    "capacity": 15,
    "steady": 60,
    "burst": 60,
    "overload": 60,
    "storm": 60,
    "soak": 1800,
}


def plan(
    scenario: str, capacity_rps: float, duration_s: float, users: int, leavers: int
) -> list[Stage]:
    """The stages of a scenario.

    Args:
        scenario: one of SCENARIOS.
        capacity_rps: the service's capacity (ignored by `capacity`).
        duration_s: how long it lasts.
        users: closed-loop clients of `capacity`.
        leavers: concurrent leaving clients of `storm`.
    """
    c, d = capacity_rps, duration_s
    plans = {
        "capacity": lambda: [Stage(d, closed_users=users)],
        "steady": lambda: [Stage(d, rate_rps=STEADY * c)],
        # At 80%, three times that for the middle third, then 80% again: the recovery.
        "burst": lambda: [
            Stage(d / 3, rate_rps=STEADY * c),
            Stage(2 * d / 3, rate_rps=BURST * c),
            Stage(d, rate_rps=STEADY * c),
        ],
        "overload": lambda: [Stage(d, rate_rps=OVERLOAD * c)],
        "storm": lambda: [Stage(d, rate_rps=STORM_STAYING * c, leavers=leavers)],
        "soak": lambda: [Stage(d, rate_rps=SOAK * c)],
    }
    if scenario not in plans:
        raise ValueError(f"unknown scenario {scenario!r}; the scenarios: {', '.join(SCENARIOS)}")
    return plans[scenario]()
