import client


def test_all_lists_exactly_the_public_names():
    public = {name for name in vars(client) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(client, name)).__name__ == "module"}
    assert sorted(client.__all__) == sorted(public - modules)


def test_every_error_derives_from_cbam_error():
    for name in client.__all__:
        thing = getattr(client, name)
        if isinstance(thing, type) and issubclass(thing, Exception):
            assert issubclass(thing, client.CbamError), name


def test_client_never_imports_server_or_models_nor_matplotlib_until_it_draws():
    import subprocess
    import sys

    code = (
        "import sys, client, client.cli; "
        "print(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('server', 'models', 'torch', 'matplotlib')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
