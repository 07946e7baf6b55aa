"""Config parsing: good values, precedence, and one-line errors for each kind of bad value."""
from __future__ import annotations

import json

import pytest
import yaml
from tandem.config import (
    SERVICE_SCHEMAS,
    ConfigError,
    DecodeConfig,
    EplbPlannerConfig,
    PrefillConfig,
    RouterConfig,
    build_parser,
    load_config,
    write_snapshot,
)


def load(schema, argv=(), env=None):
    return load_config(schema, list(argv), environ=env or {})[0]


def test_defaults_and_sglang_flag_names():
    cfg = load(DecodeConfig, ["--page-size", "32", "--disaggregation-transfer-backend", "grpc",
                              "--disable-radix-cache", "--enable-hierarchical-cache", "--hicache-ratio", "3"])
    assert cfg.page_size == 32
    assert cfg.disaggregation_transfer_backend == "grpc"
    assert cfg.disable_radix_cache is True
    assert cfg.enable_hierarchical_cache is True and cfg.hicache_ratio == 3.0
    assert cfg.disaggregation_mode == "null"
    assert load(PrefillConfig).disaggregation_mode == "prefill"


def test_precedence_file_env_cli(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"page-size": 8, "max_running_requests": 7, "chunked_prefill_size": 100}))
    env = {"TANDEM_PAGE_SIZE": "4", "TANDEM_MAX_RUNNING_REQUESTS": "9"}
    cfg = load(DecodeConfig, ["--config", str(f), "--page-size", "2"], env)
    assert cfg.page_size == 2  # CLI beats env and file
    assert cfg.max_running_requests == 9  # env beats file
    assert cfg.chunked_prefill_size == 100  # file beats default


def test_json_file_and_list_values(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"workers": ["127.0.0.1:1", "127.0.0.1:2"]}))
    assert load(RouterConfig, ["--config", str(f)]).workers == ["127.0.0.1:1", "127.0.0.1:2"]
    assert load(RouterConfig, [], {"TANDEM_WORKERS": "a:1,b:2"}).workers == ["a:1", "b:2"]
    assert load(RouterConfig, ["--workers", "x:1", "y:2"]).workers == ["x:1", "y:2"]


@pytest.mark.parametrize(
    "schema,argv,env,expected",
    [
        (DecodeConfig, ["--page-size", "0"], {}, "page_size='0'"),
        (DecodeConfig, ["--page-size", "many"], {}, "page_size='many'"),
        (DecodeConfig, ["--disaggregation-transfer-backend", "rdma"], {}, "'nixl' or 'grpc'"),
        (DecodeConfig, ["--disaggregation-mode", "decode"], {}, "prefill_addresses"),
        (DecodeConfig, ["--disaggregation-mode", "decode", "--prefill-discovery", "etcd"], {}, "--etcd-endpoint"),
        (DecodeConfig, ["--prefill-discovery", "dns"], {}, "'static' or 'etcd'"),
        (RouterConfig, ["--routing-policy", "best"], {}, "routing_policy='best'"),
        (DecodeConfig, [], {"TANDEM_HICACHE_RATIO": "1.5"}, "hicache_ratio='1.5'"),
        (DecodeConfig, ["--ep-size", "2", "--ep-num-redundant-experts", "3"], {}, "multiple of"),
        (EplbPlannerConfig, ["--eplb-algorithm", "magic"], {}, "eplb_algorithm='magic'"),
    ],
)
def test_bad_values_give_one_line_naming_field_and_allowed(schema, argv, env, expected):
    with pytest.raises(ConfigError) as info:
        load(schema, argv, env)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load(DecodeConfig, ["--config", str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("page_size: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(DecodeConfig, ["--config", str(bad)])
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("page_sise: 16\n")
    with pytest.raises(ConfigError, match="unknown field 'page_sise'"):
        load(DecodeConfig, ["--config", str(unknown)])
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("16\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load(DecodeConfig, ["--config", str(scalar)])


def test_snapshot_round_trips(tmp_path):
    cfg = load(DecodeConfig, ["--page-size", "64", "--prefill-selection", "kv_aware"])
    path = write_snapshot(cfg, tmp_path / "snap" / "decode.yaml", service="decode")
    again = load(DecodeConfig, ["--config", str(path)])
    assert again == cfg


def test_every_field_has_a_flag_with_help():
    for name, schema in SERVICE_SCHEMAS.items():
        help_text = build_parser(schema, prog=name).format_help()
        for field_name, field in schema.model_fields.items():
            assert "--" + field_name.replace("_", "-") in help_text, (name, field_name)
            assert field.description, (name, field_name)


def test_prefill_discovery_etcd_needs_no_static_addresses():
    cfg = load(DecodeConfig, ["--disaggregation-mode", "decode", "--prefill-discovery", "etcd",
                              "--etcd-endpoint", "http://etcd:2379"])
    assert cfg.prefill_addresses == [] and cfg.prefill_discovery == "etcd"


def test_advertise_host_from_env():
    # Kubernetes: bind every interface, register the pod IP (downward API -> TANDEM_ADVERTISE_HOST).
    cfg = load(DecodeConfig, ["--host", "0.0.0.0"], {"TANDEM_ADVERTISE_HOST": "10.1.2.3"})
    assert (cfg.host, cfg.advertise_host) == ("0.0.0.0", "10.1.2.3")
