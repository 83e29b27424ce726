"""All runtime settings in one class: env vars (STREAMREC_*), CLI overrides and the
README's configuration reference are generated from it, so they cannot drift."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STREAMREC_", extra="ignore")

    # --- Kafka ---------------------------------------------------------------
    bootstrap_servers: str = Field(
        "", description="Kafka bootstrap servers (host:port,...). Empty: start the embedded Tansu broker."
    )
    app_id: str = Field("streamrec", description="Faust app id = Kafka consumer group and changelog prefix.")
    partitions: int = Field(4, ge=1, le=256, description="Partitions of every topic the app creates.")
    replication_factor: int = Field(1, ge=1, description="Replication factor for topics the app creates.")
    events_topic: str = Field("clickstream.events", description="Input topic (key=user_id, JSON events).")
    dlq_topic: str = Field("clickstream.dlq", description="Dead-letter topic: original bytes + reason headers.")
    recommendations_topic: str = Field("recommendations", description="Output topic (key=user_id, JSON).")
    catalog_topic: str = Field("catalog.items", description="Compacted item upserts (key=item_id, JSON).")
    broker_session_timeout_s: float = Field(10.0, description="Consumer session timeout (Tansu needs it short).")
    broker_heartbeat_interval_s: float = Field(2.0, description="Consumer heartbeat interval.")
    broker_max_poll_interval_s: float = Field(
        300.0, description="Max time between polls before the member is dropped (long: survive overload)."
    )
    broker_rebalance_timeout_s: float = Field(
        10.0, description="JoinGroup rebalance timeout; Tansu completes a join only after it expires."
    )
    single_record_batches: bool | None = Field(
        None, description="Send each record in its own batch. Unset: on when the broker is Tansu, whose high "
                          "watermark is the last batch's base offset + 1 (breaks Faust table recovery)."
    )
    fetch_max_wait_ms: int = Field(
        50, ge=1, le=10_000, description="Consumer fetch wait; Tansu replies only when it expires, so it bounds latency."
    )
    broker_connect_timeout_s: float = Field(
        30.0, description="How long to retry reaching the broker at start before exiting with an error."
    )

    # --- State ----------------------------------------------------------------
    state_dir: Path = Field(Path("var/state"), description="RocksDB table directory (one per worker).")
    history_max: int = Field(200, ge=1, le=10_000, description="Events kept per user (raw history).")
    dedupe_window: int = Field(
        256, ge=1, le=100_000, description="Recent event ids kept per user for redelivery dedupe."
    )

    # --- Processing ---------------------------------------------------------
    batch_max: int = Field(500, ge=1, description="Max events per micro-batch.")
    batch_wait_ms: float = Field(20.0, ge=0, description="Max wait to fill a micro-batch, in ms.")
    top_k: int = Field(10, ge=1, le=1000, description="Recommendations per user.")
    max_event_bytes: int = Field(16_384, ge=256, description="Larger input messages go to the DLQ.")
    dlq_payload_cap: int = Field(
        65_536, ge=0, description="Bytes of the original payload kept in a DLQ record (rest truncated)."
    )

    # --- Model serving ---------------------------------------------------------
    model_dir: Path | None = Field(
        None, description="Checkpoint dir, or a dir of them (newest served, watched for new ones). "
                          "Unset: co-occurrence baseline."
    )
    model_b_dir: Path | None = Field(None, description="Second checkpoint (dir) served as variant B (A/B test).")
    ab_split: float = Field(0.5, ge=0.0, le=1.0, description="Share of users (by stable hash) in variant B.")
    model_poll_s: float = Field(5.0, gt=0, description="How often the model directories are checked.")
    cache_mb: float = Field(256.0, gt=0, description="KV-cache memory budget per served model, in MB.")
    device: str = Field("auto", description="Inference device: auto (CUDA if present), cpu, cuda, cuda:N.")
    max_steps_per_batch: int = Field(
        50, ge=1, description="A user with more new events than this in one batch is rebuilt instead of "
                              "appended to the KV cache (capped at the model's window)."
    )
    incremental: bool = Field(
        True, description="KV-cache steps. False recomputes every refresh from history (benchmark baseline)."
    )
    torch_threads: int = Field(
        1, ge=1, le=256, description="Intra-op CPU threads for inference. 1: small streaming batches gain "
                                     "nothing from more and stall when cores are shared (LayerNorm 20 us -> 8 ms)."
    )
    dtype: str = Field("fp32", pattern="^(fp32|bf16)$", description="Inference dtype on CUDA (fp32 or bf16).")

    # --- Serving / observability ---------------------------------------------
    web_host: str = Field("127.0.0.1", description="Bind address of /metrics, /healthz, lookups.")
    web_port: int = Field(6066, ge=0, le=65535, description="HTTP port of /metrics etc. (0 = pick free).")
    log_level: str = Field("info", description="Worker log level.")

    @property
    def embedded(self) -> bool:
        return not self.bootstrap_servers.strip()

    def source_topics(self) -> list[str]:
        """Topics the app creates explicitly (Tansu auto-creates with the wrong partition count)."""
        return [self.events_topic, self.dlq_topic, self.recommendations_topic, self.catalog_topic]


def add_settings_arguments(parser, only: list[str] | None = None) -> None:
    """One --flag per setting (env STREAMREC_<NAME> is the default), so CLI and env agree."""
    group = parser.add_argument_group("settings (each also readable from STREAMREC_<NAME>)")
    for name, field in Settings.model_fields.items():
        if only is not None and name not in only:
            continue
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"setting_{name}", default=None,
                           metavar=name.upper(), help=field.description)


def settings_from_args(args) -> Settings:
    """Env vars, overridden by any --flag given; validation errors become one-line UserErrors."""
    from pydantic import ValidationError

    from stream_app.errors import UserError

    overrides = {k[len("setting_"):]: v for k, v in vars(args).items() if k.startswith("setting_") and v is not None}
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else "?"
        raise UserError(f"invalid setting {name} ({err['msg']}); fix --{name.replace('_', '-')} "
                        f"or STREAMREC_{name.upper()}") from None


def config_reference() -> str:
    """Markdown table of every setting; README embeds it and a test keeps them equal."""
    rows = ["| setting | env var | default | description |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = f"`{default}`" if default not in ("", None) else "(empty)"
        rows.append(f"| `--{name.replace('_', '-')}` | `STREAMREC_{name.upper()}` | {shown} | {field.description} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m stream_app.config > table, for the README
    print(config_reference())
