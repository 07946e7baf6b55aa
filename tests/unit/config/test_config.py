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


def test_etcd_tls_flags_default_to_the_service_files_and_bad_combinations_fail(tmp_path):
    files = {}
    for name in ("svc.pem", "svc-key.pem", "ca.pem", "etcd.pem", "etcd-key.pem", "etcd-ca.pem"):
        (tmp_path / name).write_text("x")
        files[name] = str(tmp_path / name)
    svc = ["--ssl-certfile", files["svc.pem"], "--ssl-keyfile", files["svc-key.pem"], "--ssl-ca-certs", files["ca.pem"]]
    etcd = ["--etcd-ssl-certfile", files["etcd.pem"], "--etcd-ssl-keyfile", files["etcd-key.pem"],
            "--etcd-ssl-ca-certs", files["etcd-ca.pem"]]
    https = ["--etcd-endpoint", "https://etcd:2379"]
    assert load(DecodeConfig, https + svc).etcd_tls_paths() == (files["svc.pem"], files["svc-key.pem"], files["ca.pem"])
    assert load(DecodeConfig, https + svc + etcd).etcd_tls_paths() == (
        files["etcd.pem"], files["etcd-key.pem"], files["etcd-ca.pem"])
    # Each part defaults on its own: etcd's own CA, the service's client certificate.
    assert load(PrefillConfig, https + svc + etcd[4:]).etcd_tls_paths() == (
        files["svc.pem"], files["svc-key.pem"], files["etcd-ca.pem"])
    router = ["--discovery", "etcd"] + https
    assert load(RouterConfig, router + etcd).etcd_tls_paths()[2] == files["etcd-ca.pem"]
    assert load(DecodeConfig, ["--etcd-endpoint", "http://etcd:2379"] + svc).etcd_tls_paths() is None
    assert load(RouterConfig, svc).etcd_tls_paths() is None  # static discovery: no etcd at all
    bad = [
        (DecodeConfig, https, "https needs the CA"),
        (DecodeConfig, https + etcd[4:], "https needs a client certificate"),
        (RouterConfig, router + etcd[:2] + etcd[4:], "etcd_ssl_keyfile=None: give both or neither"),
        (DecodeConfig, ["--etcd-endpoint", "http://etcd:2379"] + etcd, "need an https:// etcd_endpoint"),
        (RouterConfig, ["--etcd-endpoint", "https://etcd:2379"] + etcd, "does not use etcd"),
        (PrefillConfig, etcd[4:], "etcd_ssl_ca_certs: etcd TLS files, but this process does not use etcd"),
        (DecodeConfig, https + svc + ["--etcd-ssl-ca-certs", str(tmp_path / "nope.pem")], "no such file"),
        (RouterConfig, ["--discovery", "etcd", "--etcd-endpoint", "etcd:2379"], "http:// or https://"),
    ]
    for schema, argv, expected in bad:
        with pytest.raises(ConfigError) as info:
            load(schema, argv)
        assert expected in str(info.value) and "\n" not in str(info.value), (argv, str(info.value))
