"""Typed load-test configuration, read from YAML (configs/loadtest/*.yaml) and CLI overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from collab.config import ConfigError, load_typed, nested, read_yaml_mapping
from collab.config import PolicyName as Policy
from collab.data.synthetic import parse_split

LoadTestConfigError = ConfigError  # the one config error type (this name kept for callers)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeviceProfile(_Strict):
    """One kind of edge device: its uplink, how it encodes images, and which policy it asks for."""

    name: str = "phone-4g"
    uplink_mbps: float = Field(10.0, gt=0, description="private uplink rate (ignored when a shared channel is set)")
    rtt_ms: float = Field(40.0, ge=0, description="round-trip time of one HTTP exchange")
    jitter_ms: float = Field(5.0, ge=0, description="uniform RTT jitter, +/- this many ms")
    jpeg_quality: int = Field(90, ge=1, le=95)
    policy: Policy | None = Field(None, description="policy the device asks for; None = the workload's")
    threshold: float | None = Field(None, description="entropy threshold in bits; None = the server's")
    max_extra_bytes: int | None = Field(None, ge=0, description="adaptive policy: the most crop bytes it sends")
    deadline_ms: float | None = Field(
        None, gt=0, description="adaptive policy: the time this device can wait for an answer (its uplink is sent too)"
    )
    weight: float = Field(1.0, gt=0, description="share of the agents with this profile")


class ChannelSettings(_Strict):
    """A multi-access uplink shared by all agents (off when capacity_mbps is None)."""

    capacity_mbps: float | None = Field(None, gt=0)
    discipline: Literal["ps", "fifo"] = "ps"


class RetrySettings(_Strict):
    """Idempotent retries on transient failures (connection errors, timeouts, 429 and 5xx)."""

    max_attempts: int = Field(6, ge=1)
    backoff_s: float = Field(0.2, ge=0, description="first backoff; doubles each attempt, with full jitter")
    backoff_max_s: float = Field(5.0, ge=0)
    request_timeout_s: float = Field(
        120.0, gt=0, description="httpx timeout of one attempt, per phase (connect, write, read)"
    )


class Workload(_Strict):
    """How queries arrive: closed loop (each agent waits think time after an answer) or open loop
    (Poisson arrivals at rate_qps per agent, answers or not)."""

    mode: Literal["closed", "open"] = "closed"
    think_time_s: float = Field(0.5, ge=0, description="closed loop: mean think time after each answer")
    think_distribution: Literal["fixed", "exponential"] = "exponential"
    rate_qps: float = Field(0.5, gt=0, description="open loop: mean arrival rate per agent")
    max_in_flight: int = Field(
        16, ge=1, description="open loop: per-agent bound on queries in flight (later arrivals wait)"
    )
    duration_s: float = Field(30.0, gt=0, description="agents stop starting queries after this")
    ramp_up_s: float = Field(5.0, ge=0, description="agent i starts at ramp_up_s * i / agents")
    drain_s: float = Field(300.0, ge=0, description="after the duration, wait this long for queries in flight")
    phases: list[tuple[float, float]] | None = Field(
        None,
        description="a load step: [[from_s, share of the agents active], ...] (e.g. [[0, 0.125], [60, 1], [120, "
        "0.125]]: 8 of 64 agents, then all, then 8 again); agent i is active while i < share x agents",
    )

    @field_validator("phases")
    @classmethod
    def _phases(cls, value):
        if value is not None:
            starts = [t for t, _ in value]
            if not value or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
                raise ValueError("phases: start at 0 s, times increasing")
            if any(not 0 < share <= 1 for _, share in value):
                raise ValueError("phases: each share of active agents must be in (0, 1]")
        return value

    def active_share(self, t: float) -> float:
        """Share of the agents active t seconds into the run (1 without phases)."""
        share = 1.0
        for start, s in self.phases or []:
            if t >= start:
                share = s
        return share


class Source(_Strict):
    """Where the agents' images and questions come from: a synthetic split or a local dataset
    (our layout: a folder with questions.jsonl and images/; or TextVQA / VQAv2 files)."""

    synthetic: str | None = Field("2024:256", description="SEED:N, generated on the fly")
    dataset: str | None = Field(None, description="path of a local dataset (replaces synthetic)")
    limit: int | None = Field(None, ge=1)

    @field_validator("synthetic")
    @classmethod
    def _split(cls, value: str | None) -> str | None:
        if value is not None:
            parse_split(value)
        return value

    @model_validator(mode="after")
    def _one_source(self):
        if self.dataset:
            self.synthetic = None
        if not self.synthetic and not self.dataset:
            raise ValueError("set source.synthetic (SEED:N) or source.dataset (PATH)")
        return self


class LoadTestConfig(_Strict):
    url: str = "http://127.0.0.1:8000"
    agents: int = Field(8, ge=1)
    agents_per_actor: int = Field(8, ge=1, description="agents hosted per Ray actor process (1 = one actor each)")
    actor_resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each agent actor (and the shared channel) asks for, e.g. {edge: 0.01}: "
        "the agents then run only on nodes started with that resource (`ray start --resources`), apart from the app",
    )
    policy: Policy = "entropy"
    seed: int = 0
    app_name: str = Field("collab", description="Serve application whose replicas are plotted")
    metrics_port: int | None = Field(None, description="serve Prometheus metrics of the edge side here")
    auth_token_env: str | None = Field(
        "COLLAB_API_TOKEN", description="send `Authorization: Bearer $VAR` when this variable is set"
    )
    workload: Workload = Workload()
    source: Source = Source()
    channel: ChannelSettings = ChannelSettings()
    retry: RetrySettings = RetrySettings()
    profiles: list[DeviceProfile] = Field(default_factory=lambda: [DeviceProfile()], min_length=1)

    @field_validator("actor_resources")
    @classmethod
    def _resources(cls, value: dict[str, float]) -> dict[str, float]:
        bad = [name for name, amount in value.items() if not amount > 0 or name in ("CPU", "GPU", "memory")]
        if bad:
            raise ValueError(f"actor_resources: custom resources with amounts > 0 only, got {bad}")
        return value

    def profile_for(self, agent_index: int) -> DeviceProfile:
        """Deterministic mix: agent i gets the profile whose weight band holds (i + 0.5) / agents; with
        load phases, (i + 0.5) x golden ratio mod 1, so that the agents of every phase hold the mix too."""
        total = sum(p.weight for p in self.profiles)
        if self.workload.phases:
            point = ((agent_index + 0.5) * 0.6180339887498949) % 1.0 * total
        else:
            point = (agent_index + 0.5) / self.agents * total
        acc = 0.0
        for profile in self.profiles:
            acc += profile.weight
            if point < acc:
                return profile
        return self.profiles[-1]


def load_loadtest_config(path: str | Path | None = None, overrides: dict | None = None) -> LoadTestConfig:
    """Config from YAML (or the defaults), with overrides, dotted ({"workload.duration_s": 60}) or nested."""
    raw = read_yaml_mapping(path, "load-test config") if path is not None else {}
    return load_typed(LoadTestConfig, raw, nested(overrides or {}), str(path or "<defaults>"), "load-test config")
