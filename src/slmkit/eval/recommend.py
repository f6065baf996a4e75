"""Which candidate to deploy: a target's constraints, its objective, and the Pareto front.

A :class:`Target` names what the user optimises (``objective``: quality = lowest KL divergence
to the teacher, size = fewest bytes, speed = most decode tokens/s) and the constraints a
candidate must meet (file size, device memory, a quality floor, a speed floor, allowed file
types). :func:`recommend` keeps the candidates that meet every constraint and picks the best one
by the objective (ties: lower KL divergence, then fewer bytes, then faster); when none meets them
it recommends nothing and says why, per constraint.

A candidate *dominates* another when it is no larger, no slower (decode speed within
``speed_tolerance``: two files of the same types run the same kernels, so a smaller gap is the
noise of the machine) and has strictly lower KL divergence. :func:`pareto_front` is the set no
other candidate dominates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from slmkit.errors import ConfigError

OBJECTIVES = ("quality", "size", "speed")


@dataclass(frozen=True)
class Target:
    objective: Literal["quality", "size", "speed"] = "quality"  #: what the recommendation optimises
    max_bytes: int | None = None  #: largest file (bytes)
    memory_bytes: int | None = None  #: largest memory: file + KV cache at ``context`` + runtime overhead
    context: int = 2048  #: tokens of KV cache counted in memory
    max_kl_divergence: float | None = None  #: quality floor: mean KL divergence to the teacher at most this
    min_speedup: float | None = None  #: decode tokens/s at least this multiple of the teacher's (same run)
    types: tuple[str, ...] = ()  #: allowed GGUF file types (e.g. Q4_0, Q4_K_M); empty: any
    beat: str | None = None  #: a baseline's file type (e.g. Q4_K_M): a candidate's KL divergence must be below that baseline's
    speed_tolerance: float = 0.05  #: relative decode-speed gap treated as equal (machine noise)
    label: str = ""  #: how the report names the target (e.g. "phone-4gb")

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        for name in ("max_bytes", "memory_bytes", "max_kl_divergence", "min_speedup"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"{name} must be > 0, got {v}")
        if self.context < 1 or not 0 <= self.speed_tolerance < 1:
            raise ConfigError(f"context must be >= 1 and speed_tolerance in [0, 1), got {self.context}, {self.speed_tolerance}")

    def describe(self) -> str:
        """The target in words, e.g. "best quality with a file of at most 120.0 MB"."""
        goal = {"quality": "best quality (lowest KL divergence to the teacher)", "size": "smallest file",
                "speed": "fastest decode"}[self.objective]
        parts = []
        if self.max_bytes:
            parts.append(f"a file of at most {_mb(self.max_bytes)}")
        if self.memory_bytes:
            parts.append(f"at most {_mb(self.memory_bytes)} of memory with a {self.context:,}-token context")
        if self.max_kl_divergence:
            parts.append(f"KL divergence at most {self.max_kl_divergence:g}")
        if self.min_speedup:
            parts.append(f"decode at least {self.min_speedup:g}x the teacher's")
        if self.types:
            parts.append(f"file type {' or '.join(self.types)}")
        if self.beat:
            parts.append(f"lower KL divergence than the reference {self.beat} baseline")
        return goal + (" with " + ", ".join(parts) if parts else "")


def _kl(v: float) -> str:
    return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def _mb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def violations(row: dict, target: Target, teacher_speed: float | None, beat: dict | None = None) -> list[str]:
    """Why ``row`` misses the target (empty when it meets every constraint); ``beat`` is the baseline row of ``target.beat``."""
    out = []
    if target.beat:
        kl, ref = row.get("kl_divergence"), (beat or {}).get("kl_divergence")
        if ref is None:
            out.append(f"no {target.beat} baseline was measured to compare with")
        elif row is beat or kl is None or kl >= ref:
            out.append(f"KL divergence {'unmeasured' if kl is None else _kl(kl)} not below the {beat['name']} baseline's {_kl(ref)}")
    if target.max_bytes and row["bytes"] > target.max_bytes:
        out.append(f"file {_mb(row['bytes'])} > {_mb(target.max_bytes)}")
    if target.memory_bytes and (row.get("memory_bytes") or 0) > target.memory_bytes:
        out.append(f"memory {_mb(row['memory_bytes'])} > {_mb(target.memory_bytes)}")
    if target.max_kl_divergence is not None:
        kl = row.get("kl_divergence")
        if kl is None or kl > target.max_kl_divergence:
            out.append(f"KL divergence {'unmeasured' if kl is None else _kl(kl)} > {target.max_kl_divergence:g}")
    if target.min_speedup is not None:
        v = row.get("decode_tokens_per_s")
        if not v or not teacher_speed or v < target.min_speedup * teacher_speed * (1 - target.speed_tolerance):
            out.append("decode " + ("unmeasured" if not v or not teacher_speed else f"{v / teacher_speed:.2f}x")
                       + f" < {target.min_speedup:g}x the teacher")
    if target.types and row.get("file_type") not in target.types:
        out.append(f"type {row.get('file_type')} not in {', '.join(target.types)}")
    return out


def dominates(a: dict, b: dict, speed_tolerance: float = 0.05) -> bool:
    """``a`` no larger, no slower (within tolerance) and strictly lower KL divergence than ``b``."""
    if a.get("kl_divergence") is None or b.get("kl_divergence") is None:
        return False
    sa, sb = a.get("decode_tokens_per_s"), b.get("decode_tokens_per_s")
    if sa is None or sb is None:  # speed unknown for one of them: cannot say it is no slower
        no_slower = sa is None and sb is None
    else:
        no_slower = sa >= sb * (1 - speed_tolerance)
    return a["bytes"] <= b["bytes"] and no_slower and a["kl_divergence"] < b["kl_divergence"]


def pareto_front(rows: Sequence[dict], speed_tolerance: float = 0.05) -> list[str]:
    """Names of the rows no other row dominates."""
    return [r["name"] for r in rows if not any(dominates(o, r, speed_tolerance) for o in rows if o is not r)]


def _sort_key(row: dict, objective: str):
    kl = row.get("kl_divergence")
    kl = float("inf") if kl is None else kl
    speed = -(row.get("decode_tokens_per_s") or 0.0)
    if objective == "size":
        return (row["bytes"], kl, speed)
    if objective == "speed":
        return (speed, kl, row["bytes"])
    return (kl, row["bytes"], speed)


@dataclass
class Recommendation:
    name: str | None  #: the recommended candidate's name; None when no candidate meets the target
    reason: str  #: one sentence for the report
    target: str  #: the target in words
    feasible: list[str] = field(default_factory=list)
    misses: dict[str, list[str]] = field(default_factory=dict)  #: candidate -> why it misses the target
    front: list[str] = field(default_factory=list)  #: the Pareto front (size, speed, KL divergence)
    warnings: list[str] = field(default_factory=list)


def recommend(rows: Sequence[dict], target: Target) -> Recommendation:
    """The candidate that best meets ``target`` (rows carry name, bytes, kl_divergence, decode_tokens_per_s, ...)."""
    teacher = next((r for r in rows if r.get("role") == "teacher"), None)
    teacher_speed = teacher.get("decode_tokens_per_s") if teacher else None
    beat = next((r for r in rows if r.get("role") == "baseline" and r.get("file_type") == target.beat), None)
    misses = {r["name"]: violations(r, target, teacher_speed, beat) for r in rows}
    feasible = [r for r in rows if not misses[r["name"]] and r.get("kl_divergence") is not None]
    front = pareto_front(rows, target.speed_tolerance)
    words = target.describe()
    if not feasible:
        closest = min(rows, key=lambda r: (len(misses[r["name"]]), _sort_key(r, target.objective))) if rows else None
        why = f"; closest: {closest['name']} ({'; '.join(misses[closest['name']])})" if closest else ""
        msg = f"no candidate meets the target ({words}){why}"
        return Recommendation(None, msg, words, [], {k: v for k, v in misses.items() if v}, front, [msg])
    if target.objective == "speed":  # speeds within the tolerance are a tie: the better quality wins it
        top = max(r.get("decode_tokens_per_s") or 0.0 for r in feasible)
        feasible = sorted(feasible, key=lambda r: ((r.get("decode_tokens_per_s") or 0.0) < top * (1 - target.speed_tolerance),
                                                   _sort_key(r, "quality")))
    else:
        feasible = sorted(feasible, key=lambda r: _sort_key(r, target.objective))
    best = feasible[0]
    reason = _reason(best, feasible, rows, target)
    return Recommendation(best["name"], reason, words, [r["name"] for r in feasible],
                          {k: v for k, v in misses.items() if v}, front)


def _reason(best: dict, feasible: Sequence[dict], rows: Sequence[dict], target: Target) -> str:
    """One sentence: what the recommendation wins on, against the runner-up that meets the target."""
    others = [r for r in feasible if r is not best]  # in the order of preference
    head = f"{best['name']} is the {target.describe()}"
    if not others:
        return head + f"; it is the only candidate that meets the target ({len(rows) - 1} others do not)."
    nxt = others[0]
    if target.objective == "quality":
        cmp = f"KL divergence {_kl(best['kl_divergence'])} against {_kl(nxt['kl_divergence'])} for the runner-up {nxt['name']}"
    elif target.objective == "size":
        cmp = f"{_mb(best['bytes'])} against {_mb(nxt['bytes'])} for the runner-up {nxt['name']}"
    else:
        cmp = (f"{best.get('decode_tokens_per_s') or 0:.1f} decode tokens/s against "
               f"{nxt.get('decode_tokens_per_s') or 0:.1f} for the runner-up {nxt['name']}")
    return f"{head}: {cmp}."
