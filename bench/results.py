"""One row of the benchmark table, and how the suite prints and saves them."""

import json
import statistics
from dataclasses import asdict, dataclass
from datetime import date

import torch

from peer.calibration import cpu_description

# A local reference whose slowest round took this much longer than its fastest was disturbed (other work on the
# machine, a frequency change): its figures are flagged in the table.
NOISY_SPREAD = 1.3


@dataclass
class Result:
    metric: str
    unit: str
    swarm: float
    local: float | None = None  # the local `transformers` counterpart measured in the same run, if there is one
    higher_is_better: bool = True
    detail: str = ""
    swarm_range: tuple[float, float] | None = None  # min and max over the rounds
    local_range: tuple[float, float] | None = None
    ratio_range: tuple[float, float] | None = None  # of the ratios of rounds run in turns (noise hits both alike)
    warning: str = ""  # why the figure should not be trusted

    @classmethod
    def measured(cls, metric: str, unit: str, swarm: list[float], local: list[float] | None = None,
                 higher_is_better: bool = True, detail: str = "") -> "Result":
        """From the figures of each round; `swarm[i]` and `local[i]` ran in the same round."""
        result = cls(metric, unit, statistics.median(swarm), statistics.median(local) if local else None, higher_is_better,
                     detail, swarm_range=(min(swarm), max(swarm)))
        if local:
            result.local_range = (min(local), max(local))
            ratios = [_ratio(mine, theirs, higher_is_better) for mine, theirs in zip(swarm, local)]
            result.ratio_range = (min(ratios), max(ratios))
            if max(local) > NOISY_SPREAD * min(local):
                result.warning = f"local reference varied {max(local) / min(local):.2f}x between rounds"
        return result

    @property
    def ratio(self) -> float | None:
        """swarm / local for rates, local / swarm for times: above 1 means the swarm is ahead."""
        if self.local is None:
            return None
        return _ratio(self.swarm, self.local, self.higher_is_better)


def _ratio(swarm: float, local: float, higher_is_better: bool) -> float:
    return swarm / local if higher_is_better else local / swarm


def _figure(value: float, spread: tuple[float, float] | None, unit: str, digits: str = ".4g") -> str:
    text = f"{value:{digits}}"
    if spread is not None and spread[0] != spread[1]:
        text += f" ({spread[0]:{digits}}-{spread[1]:{digits}})"
    return f"{text} {unit}".strip()


def machine() -> str:
    return f"{cpu_description()}, torch {torch.__version__}"


def table(results: list[Result], peer_settings: list[str] = ()) -> str:
    """The markdown table; `peer_settings`: what each benchmark peer chose when it started."""
    lines = [f"Swarm benchmarks, {date.today().isoformat()}, {machine()}", ""]
    lines += [f"- peer {setting}" for setting in peer_settings] + ([""] if peer_settings else [])
    lines += [
        "| metric | swarm, median (min-max) | local transformers | ratio | |",
        "|---|---:|---:|---:|---|",
    ]
    for result in results:
        local = "" if result.local is None else _figure(result.local, result.local_range, result.unit)
        ratio = "" if result.ratio is None else _figure(result.ratio, result.ratio_range, "", ".2f") + "x"
        detail = result.detail + (f" **not trusted: {result.warning}**" if result.warning else "")
        lines.append(f"| {result.metric} | {_figure(result.swarm, result.swarm_range, result.unit)} | {local} | {ratio} | {detail} |")
    return "\n".join(lines)


def save_json(results: list[Result], path: str, peer_settings: list[str] = ()) -> None:
    rows = [dict(asdict(result), ratio=result.ratio) for result in results]
    summary = {"date": date.today().isoformat(), "machine": machine(), "peer_settings": list(peer_settings), "results": rows}
    with open(path, "w") as file:
        json.dump(summary, file, indent=2)
