"""All runtime settings in one class: env vars (STREAMREC_*), CLI overrides and the
docs/configuration.md's settings table are generated from it, so they cannot drift."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, FilePath, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.config import LearnConfig
from model.seen import DISMISS_TTL_S


_LEARN = LearnConfig()  # the learner's defaults live with its algorithm; offline eval uses the same


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
    trending_topic: str = Field(
        "trending", description="Compacted trending snapshots, one per input partition (key=p<partition>, JSON)."
    )
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
    broker_probe_s: float = Field(2.0, gt=0, description="How often a running worker checks the broker answers.")
    broker_lost_exit_s: float = Field(
        300.0, ge=0, description="Broker unreachable this long: shut down cleanly, exit code 3 (0 = retry forever)."
    )

    # --- Security (stream_app/transport/security.py maps these onto every Kafka client) -------
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka protocol of every client: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "PLAIN", description="SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512."
    )
    sasl_username: str | None = Field(None, description="SASL user; required with SASL_*.")
    sasl_password: SecretStr | None = Field(
        None, description="SASL password; required with SASL_*. Never logged; use the env var (flags show in ps)."
    )
    ssl_cafile: FilePath | None = Field(
        None, description="PEM CA bundle the broker certificates are checked against. Unset: the system CAs."
    )
    ssl_certfile: FilePath | None = Field(None, description="PEM client certificate for mutual TLS (may hold the key).")
    ssl_keyfile: FilePath | None = Field(None, description="PEM key of ssl_certfile, if not in it (unencrypted).")
    ssl_check_hostname: bool = Field(
        True, description="Check the broker certificate names the host dialled (the chain is always verified)."
    )

    # --- State ----------------------------------------------------------------
    state_dir: Path = Field(Path("var/state"), description="RocksDB table directory (one per worker).")
    history_max: int = Field(200, ge=1, le=10_000, description="Events kept per user (raw history).")
    dedupe_window: int = Field(
        256, ge=1, le=100_000, description="Recent event ids kept per user for redelivery dedupe."
    )
    state_ttl_days: float = Field(
        90.0, ge=0, description="Users with no event for this long are dropped from state (0 = keep forever)."
    )
    ttl_sweep_s: float = Field(600.0, gt=0, description="How often the TTL sweep scans this worker's users.")
    state_memory_mb: float = Field(
        128.0, gt=0, description="RocksDB memory of the whole worker: block cache and memtables of all "
        "its partitions, shared (half of it may be memtables)."
    )
    state_write_buffer_mb: float = Field(
        16.0, gt=0, description="Size of one RocksDB memtable (at most half of state_memory_mb)."
    )
    state_cache_mb: float = Field(
        128.0, ge=0, description="Decoded states of recently active users kept in memory (a 200-event "
        "history takes ~50 KB); a hit skips the table read and JSON decode. 0 = off."
    )

    allocator: str = Field(
        "auto", pattern="^(auto|jemalloc|glibc)$", description="C allocator of the worker: jemalloc keeps RSS "
        "flat over long runs where glibc's fragments; auto = jemalloc where installed (apt-get install libjemalloc2)."
    )

    event_loop: str = Field(
        "auto", pattern="^(auto|uvloop|asyncio)$", description="Event loop of the worker: uvloop cuts the "
        "loop's own share of CPU per event; auto = uvloop where installed."
    )

    # --- Processing ---------------------------------------------------------
    batch_max: int = Field(500, ge=1, description="Max events per micro-batch.")
    batch_wait_ms: float = Field(20.0, ge=0, description="Max wait to fill a micro-batch, in ms.")
    top_k: int = Field(10, ge=1, le=1000, description="Recommendations per user.")
    exclude_seen: str = Field(
        "interacted", pattern="^(none|purchased|interacted)$",
        description="Items never recommended back to a user: none, purchased, or every item interacted "
                    "with. `streamrec eval` applies the same policy (docs/model.md, Seen items)."
    )
    exclude_seen_window: int = Field(
        0, ge=0, description="Only the user's last N item events count as seen (0 = the whole stored history)."
    )
    dismiss_ttl_s: float = Field(
        DISMISS_TTL_S, ge=0, description="Seconds an item a user dismissed is not recommended to them, from "
        "the dismiss to their newest event; a later click, add_to_cart or purchase of it lifts the dismissal "
        "(0: dismissals exclude nothing, the model still reads them)."
    )
    rules_pool: int = Field(
        100, ge=1, le=10_000, description="Candidates scored before a list's rules drop or move items "
                                          "(filters, diversity, boosts); `streamrec eval --rules` uses the same.")
    reasons: bool = Field(True, description="Give every recommended item a reason (docs/contracts.md, Reasons).")
    surfaces_file: Path | None = Field(
        None, description="TOML file naming the lookup API's surfaces, their k and rules (docs/contracts.md, "
                          "Surfaces). Unset: for_you, similar, trending and after_search without rules.")
    max_event_bytes: int = Field(16_384, ge=256, description="Larger input messages go to the DLQ.")
    dlq_payload_cap: int = Field(
        65_536, ge=0, description="Bytes of the original payload kept in a DLQ record (rest truncated)."
    )

    # --- Trending (stream_app/pipeline/trending.py) ---------------------------------
    trending_half_life_s: float = Field(
        3600.0, ge=1, description="Trending: an item event's weight halves every this many seconds of record time."
    )
    trending_publish_s: float = Field(
        10.0, gt=0, le=3600, description="How often a worker publishes its partitions' trending snapshots; an "
                                         "event reaches the trending answer within about this long."
    )
    trending_keep: int = Field(
        1_000, ge=1, le=10_000, description="Items per trending snapshot (the strongest of one input partition)."
    )
    trending_max_items: int = Field(
        100_000, ge=2, description="Items a worker counts per owned input partition for trending (~150 bytes "
                                   "each); past it the weakest half is dropped. At least 2 x trending_keep."
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
    fallback_max_entries: int = Field(
        1_000_000, ge=1000, description="Co-occurrence fallback budget: item-pair entries kept in total "
                                        "(~64-120 bytes each); the least recently updated item's list goes first."
    )
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
    retrieval: str = Field(
        "auto", pattern="^(exact|ann|auto)$",
        description="Top-K over the catalog: exact (score every item), ann (HNSW candidates, then exact "
                    "scores on them), auto (ann from ann_min_items up).")
    ann_min_items: int = Field(
        50_000, ge=1, description="Catalog size from which retrieval=auto uses the HNSW index "
                                   "(the measured crossover, docs/benchmarks.md#retrieval).")
    ann_candidates: int = Field(100, ge=10, le=10_000,
                                description="Graph candidates per user before filters (plus the user's exclusions).")
    ann_ef_search: int = Field(128, ge=10, le=10_000, description="HNSW search breadth (>= ann_candidates is used).")
    ann_degree: int = Field(32, ge=4, le=128, description="HNSW links per item: more = higher recall, more memory.")

    # --- Continual learning (`streamrec learn`, model/continual.py) -------------
    learn_group: str = Field("streamrec-learner", min_length=1,
                             description="Consumer group of `streamrec learn` (its committed offsets).")
    learn_interval_s: float = Field(
        _LEARN.interval_s, gt=0, description="The learner updates at least this often (seconds) ...")
    learn_every_events: int = Field(_LEARN.every_events, ge=1, description="... or after this many new events.")
    learn_update_s: float = Field(
        _LEARN.update_s, gt=0, description="Fine-tune budget of one update (seconds); keep it under learn_interval_s.")
    learn_memory_mb: float = Field(
        _LEARN.memory_mb, gt=0, description="Learner memory for recent per-user histories and the replay sample.")
    learn_margin: float = Field(
        _LEARN.margin, ge=0, description="A candidate is published only if its NDCG@10 on the held-out recent "
                                         "events beats the serving model's by more than this.")
    min_item_events: int = Field(
        _LEARN.min_item_events, ge=1, description="Events before a new item gets its own ID row in the model.")
    learn_threads: int = Field(1, ge=1, le=256, description="CPU threads of the learner's training (its core cap).")
    learn_device: str = Field("auto", description="Learner device: auto (CUDA if present), cpu, cuda, cuda:N.")
    learn_keep: int = Field(5, ge=1, description="Published versions the learner keeps in model_dir (older pruned).")
    learn_port: int = Field(6067, ge=0, le=65535, description="HTTP port of the learner's /metrics.")

    # --- Serving / observability ---------------------------------------------
    web_host: str = Field("127.0.0.1", description="Bind address of /metrics, /healthz, lookups.")
    web_port: int = Field(6066, ge=0, le=65535, description="HTTP port of /metrics etc. (0 = pick free).")
    web_advertised_host: str = Field(
        "", description="Host name other workers use to forward a lookup here (default: web_host, or this "
                        "host's name when web_host is a wildcard such as 0.0.0.0).")
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        "info", description="Log level of the worker and the learner: debug, info, warning, error or critical.")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines of the worker and the learner: text, or json (one object per line: "
                            "ts, level, logger, message).")

    @field_validator("model_dir", "model_b_dir", "surfaces_file", mode="before")
    @classmethod
    def _empty_dir_is_none(cls, value):
        """`STREAMREC_MODEL_DIR=""` means no model directory (compose files and shells set
        variables empty to unset them), not the current directory."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("security_protocol", "sasl_mechanism", mode="before")
    @classmethod
    def _upper(cls, value):
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value):
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _memtable_fits(self) -> "Settings":
        """Memtables may use half the RocksDB budget; one larger than that would be flushed
        the moment it filled, and the budget would not hold."""
        if self.state_write_buffer_mb > self.state_memory_mb / 2:
            raise ValueError(f"state_write_buffer_mb={self.state_write_buffer_mb:g} is over half of "
                             f"state_memory_mb={self.state_memory_mb:g}; raise STREAMREC_STATE_MEMORY_MB or "
                             "lower STREAMREC_STATE_WRITE_BUFFER_MB")
        return self

    @model_validator(mode="after")
    def _trending_fits(self) -> "Settings":
        """Pruning keeps half of trending_max_items: a snapshot must still find trending_keep."""
        if self.trending_max_items < 2 * self.trending_keep:
            raise ValueError(f"trending_max_items={self.trending_max_items} is under 2 x trending_keep="
                             f"{self.trending_keep}; raise STREAMREC_TRENDING_MAX_ITEMS or lower "
                             "STREAMREC_TRENDING_KEEP")
        return self

    @model_validator(mode="after")
    def _security_is_consistent(self) -> "Settings":
        """Refuse settings that would connect with less security than the user asked for
        (credentials or certificates silently unused) or could never connect."""
        proto = self.security_protocol
        sasl, tls = proto.startswith("SASL_"), proto.endswith("SSL")
        password = self.sasl_password.get_secret_value() if self.sasl_password else ""
        if sasl and not (self.sasl_username and password):
            raise ValueError(f"security_protocol={proto} needs a user and password; set STREAMREC_SASL_USERNAME "
                             "and STREAMREC_SASL_PASSWORD")
        if not sasl and (self.sasl_username or password):
            raise ValueError(f"SASL credentials are set but security_protocol={proto} does not use them; "
                             "set STREAMREC_SECURITY_PROTOCOL=SASL_SSL (or SASL_PLAINTEXT) or unset them")
        files = [name for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile") if getattr(self, name)]
        if files and not tls:
            raise ValueError(f"{files[0]} is set but security_protocol={proto} does not use TLS; "
                             "set STREAMREC_SECURITY_PROTOCOL=SSL (or SASL_SSL) or unset it")
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ValueError("ssl_keyfile is set without a certificate; set STREAMREC_SSL_CERTFILE too")
        if proto != "PLAINTEXT" and self.embedded:
            raise ValueError(f"security_protocol={proto} needs STREAMREC_BOOTSTRAP_SERVERS: "
                             "the embedded broker speaks PLAINTEXT only")
        return self

    @property
    def embedded(self) -> bool:
        return not self.bootstrap_servers.strip()

    @property
    def seen_policy(self) -> tuple[str, int, float]:
        """(exclude_seen, exclude_seen_window, dismiss_ttl_s): the arguments of model.seen.excluded."""
        return self.exclude_seen, self.exclude_seen_window, self.dismiss_ttl_s

    def source_topics(self) -> list[str]:
        """Topics the app creates explicitly (Tansu auto-creates with the wrong partition count)."""
        return [self.events_topic, self.dlq_topic, self.recommendations_topic, self.catalog_topic,
                self.trending_topic]


# Every command that opens a Kafka client offers these (produce and forget list their flags)
SECURITY_FIELDS = ["security_protocol", "sasl_mechanism", "sasl_username", "sasl_password",
                   "ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname"]


def is_bool(field) -> bool:
    """bool and bool | None settings: their flag needs no value."""
    return field.annotation is bool or (bool in get_args(field.annotation) and
                                        set(get_args(field.annotation)) <= {bool, type(None)})


def add_settings_arguments(parser, only: list[str] | None = None) -> None:
    """One --flag per setting (env STREAMREC_<NAME> is the default), so CLI and env agree.
    A boolean's `--flag` alone means true and `--no-flag` false (`--flag false` works too)."""
    group = parser.add_argument_group("settings (each also readable from STREAMREC_<NAME>)")
    for name, field in Settings.model_fields.items():
        if only is not None and name not in only:
            continue
        flag, dest = name.replace("_", "-"), f"setting_{name}"
        if is_bool(field):
            group.add_argument(f"--{flag}", dest=dest, default=None, nargs="?", const="true", metavar="BOOL",
                               help=field.description)
            group.add_argument(f"--no-{flag}", dest=dest, action="store_const", const="false",
                               help=f"--{flag} false")
        else:
            group.add_argument(f"--{flag}", dest=dest, default=None, metavar=name.upper(), help=field.description)


def settings_from_args(args) -> Settings:
    """Env vars, overridden by any --flag given; validation errors become one-line UserErrors."""
    from pydantic import ValidationError

    from stream_app.errors import UserError

    overrides = {k[len("setting_"):]: v for k, v in vars(args).items() if k.startswith("setting_") and v is not None}
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        if not err["loc"]:  # a cross-field check: its message already names the fix
            raise UserError(err["msg"].removeprefix("Value error, ")) from None
        name = str(err["loc"][0])
        raise UserError(f"invalid setting {name} ({err['msg']}); fix --{name.replace('_', '-')} "
                        f"or STREAMREC_{name.upper()}") from None


def config_reference() -> str:
    """Markdown table of every setting; docs/configuration.md embeds it and a test keeps them equal."""
    rows = ["| setting | env var | default | description |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = f"`{default}`" if default not in ("", None) else "(empty)"
        rows.append(f"| `--{name.replace('_', '-')}` | `STREAMREC_{name.upper()}` | {shown} | {field.description} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m stream_app.config > table, for docs/configuration.md
    print(config_reference())
