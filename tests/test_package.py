import entflash


def test_version_is_a_release_string():
    parts = entflash.__version__.split(".")
    assert len(parts) == 3 and all(p.isdigit() for p in parts)
