import numpy as np

from facedetail.estimation.cache import FaceCache


def test_cache_roundtrip_and_keys_depend_on_content_and_settings(tmp_path):
    cache = FaceCache(tmp_path, "fit", {"iters": 10})
    assert cache.get("abc") is None
    cache.put("abc", {"coeffs": np.arange(4.0), "name": np.array("x")})
    got = FaceCache(tmp_path, "fit", {"iters": 10}).get("abc")
    np.testing.assert_array_equal(got["coeffs"], np.arange(4.0))
    assert str(got["name"]) == "x"
    assert FaceCache(tmp_path, "fit", {"iters": 11}).get("abc") is None  # changed setting -> miss
    assert FaceCache(tmp_path, "fit", {"iters": 10}).get("abd") is None  # changed content -> miss
    assert cache.hits == 0 and cache.misses == 1


def test_corrupt_entry_is_a_miss_and_is_removed(tmp_path):
    cache = FaceCache(tmp_path, "fit", {})
    cache.put("abc", {"a": np.zeros(3)})
    cache.path("abc").write_bytes(b"truncated")
    assert cache.get("abc") is None
    assert not cache.path("abc").exists()


def test_disabled_cache_never_hits(tmp_path):
    cache = FaceCache(tmp_path, "fit", {}, enabled=False)
    cache.put("abc", {"a": np.zeros(3)})
    assert cache.get("abc") is None
