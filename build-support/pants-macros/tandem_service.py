# Pants BUILD-file prelude (pants.toml: build_file_prelude_globs): the targets of one service.


def tandem_service(name, package=None):
    """`services/<name>`: its sources and one PEX, dist/tandem-<name>.pex, that runs
    `python -m tandem.<package>` (package defaults to the service name)."""
    python_sources(name="src", sources=["tandem/**/*.py"])  # noqa: F821 (a Pants target type)
    pex_binary(  # noqa: F821
        name=name,
        entry_point=f"tandem.{package or name}.__main__",
        output_path=f"tandem-{name}.pex",
        execution_mode="venv",
    )
