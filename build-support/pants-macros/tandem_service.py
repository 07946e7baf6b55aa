# Pants BUILD-file prelude (pants.toml: build_file_prelude_globs): the targets of one service.

# The services tandem ships and the module `python -m` runs for each. This is the one table: the
# Pants targets below, the OCI images' entrypoints (build-support/images/build.py), their tests
# (test_images.py, pex_smoke.py), `make deploy-local` (deploy/local/stack.py) and the check of the
# deploy files (tests/unit/test_entrypoints.py) all read it, Python code through deploy/services.py.
# A literal tuple of (service, module) pairs: deploy/services.py reads it with ast.literal_eval
# (Pants macros cannot import), and a prelude symbol's value must be hashable for Pants (no dict).
TANDEM_SERVICES = (
    ("router", "tandem.router"),
    ("prefill", "tandem.prefill"),
    ("decode", "tandem.decode"),
    ("eplb", "tandem.eplb_planner"),
)


def tandem_service(name):
    """`services/<name>`: its sources and one PEX, dist/tandem-<name>.pex, that runs
    `python -m <module>`, its module from TANDEM_SERVICES."""
    python_sources(name="src", sources=["tandem/**/*.py"])  # noqa: F821 (a Pants target type)
    pex_binary(  # noqa: F821
        name=name,
        entry_point=f"{dict(TANDEM_SERVICES)[name]}.__main__",
        output_path=f"tandem-{name}.pex",
        execution_mode="venv",
    )
