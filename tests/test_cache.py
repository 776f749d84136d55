"""The task cache: what changes a key, what round-trips exactly, what is refused.

Real files in ``tmp_path``; cross-process claims are checked with real processes
(``python -c`` subprocesses and spawned workers), never with sleeps.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pandas as pd
import pytest

from flowyml.cache import Cache, code_fingerprint, default_cache_dir, task_key
from flowyml.exceptions import CacheError, FlowymlError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FINGERPRINT = "0" * 64


# ------------------------------------------------------------------ helpers


def load_module(tmp_path: pathlib.Path, name: str, source: str):
    """Import ``source`` as a real module file, so inspect.getsource works on it."""
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_python(code: str, *, hash_seed: str, cwd: pathlib.Path | None = None) -> str:
    """Run ``code`` in a fresh interpreter with a given PYTHONHASHSEED; its stdout."""
    env = dict(os.environ)
    env["PYTHONHASHSEED"] = hash_seed
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), str(cwd or ""), env.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def entry_header(cache: Cache, key: str) -> dict:
    """The JSON header of an entry, read as the module docstring documents it."""
    data = cache.entry_path(key).read_bytes()
    (length,) = struct.unpack(">I", data[8:12])
    return json.loads(data[12 : 12 + length])


def assert_frames_identical(got: pd.DataFrame, want: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(
        got, want, check_exact=True, check_index_type=True, check_column_type=True, check_freq=True
    )
    assert type(got.index) is type(want.index)
    assert type(got.columns) is type(want.columns)
    assert got.attrs == want.attrs


@pytest.fixture
def cache(tmp_path) -> Cache:
    return Cache(tmp_path / "cache")


# ---------------------------------------------------------- code_fingerprint

STEP_V1 = """
    import functools

    def clean(df, factor=2):
        return df * factor + 1
"""

STEP_V1_REFORMATTED = """
    import functools

    # a comment above
    @functools.lru_cache  # the function's own decorator is configuration, not code
    def clean(df,
              factor=2):
        # a comment inside

        return df*factor   +   1   # trailing comment
"""


def test_fingerprint_changes_with_the_body(tmp_path):
    v1 = load_module(tmp_path, "fp_body_v1", STEP_V1).clean
    v2 = load_module(tmp_path, "fp_body_v2", STEP_V1.replace("+ 1", "+ 2")).clean
    assert code_fingerprint(v1) != code_fingerprint(v2)


def test_fingerprint_ignores_comments_layout_and_own_decorators(tmp_path):
    v1 = load_module(tmp_path, "fp_fmt_v1", STEP_V1).clean
    reformatted = load_module(tmp_path, "fp_fmt_v2", STEP_V1_REFORMATTED).clean.__wrapped__
    assert code_fingerprint(v1) == code_fingerprint(reformatted)


SOURCES = """
    import functools

    @functools.lru_cache
    @functools.wraps(print)
    def decorated(x):
        return x


    class Holder:
        def method(self, y):
            def nested(z):
                return z + y
            return nested

        @staticmethod
        async def later(q):
            return q


    def one_line(a): return a  # noqa
"""


def test_a_function_s_source_is_read_as_inspect_reads_it(tmp_path):
    # The fingerprint reads a function's block from its file and first line
    # rather than through inspect's module search (60 ms an all-cached run):
    # the same text, or every cached entry's key would change.
    import inspect

    from flowyml.cache.fingerprint import _source

    module = load_module(tmp_path, "fp_sources", SOURCES)
    codes = [module.decorated.__wrapped__.__code__, module.Holder.method.__code__,
             module.Holder.method(None, 1).__code__, module.Holder.later.__code__, module.one_line.__code__,
             code_fingerprint.__code__]
    for code in codes:
        assert _source(code) == inspect.getsource(code), code.co_name
    # A notebook cell: its source lives in linecache only, under a made-up name.
    cell = "def in_a_cell(v):\n    return v * 2\n"
    name = "<ipython-input-7-flowyml>"
    import linecache

    linecache.cache[name] = (len(cell), None, cell.splitlines(True), name)
    namespace: dict = {}
    exec(compile(cell, name, "exec"), namespace)
    assert _source(namespace["in_a_cell"].__code__) == cell


def test_fingerprint_changes_with_a_default(tmp_path):
    v1 = load_module(tmp_path, "fp_default_v1", STEP_V1).clean
    v2 = load_module(tmp_path, "fp_default_v2", STEP_V1.replace("factor=2", "factor=3")).clean
    assert code_fingerprint(v1) != code_fingerprint(v2)


def test_fingerprint_changes_with_a_closure_value():
    def make(threshold, columns):
        def keep(df):
            return df[df[columns] > threshold]
        return keep

    assert code_fingerprint(make(1, ["a"])) == code_fingerprint(make(1, ["a"]))
    assert code_fingerprint(make(1, ["a"])) != code_fingerprint(make(2, ["a"]))
    assert code_fingerprint(make(1, ["a"])) != code_fingerprint(make(1, ["b"]))


GLOBALS_MODULE = """
    THRESHOLD = {threshold}
    COLUMNS = ("a", "b")

    def helper(x):
        return x * {factor}

    def step(df):
        return helper(df[list(COLUMNS)]) > THRESHOLD
"""


def test_fingerprint_follows_global_constants_and_helper_functions(tmp_path):
    def fingerprint(name, threshold, factor):
        source = GLOBALS_MODULE.format(threshold=threshold, factor=factor)
        return code_fingerprint(load_module(tmp_path, name, source).step)

    base = fingerprint("fp_glob_a", 3, 2)
    assert fingerprint("fp_glob_b", 3, 2) == base  # same code in another module
    assert fingerprint("fp_glob_c", 4, 2) != base  # a referenced constant changed
    assert fingerprint("fp_glob_d", 3, 5) != base  # a called helper's body changed


WRAPPED_HELPER_MODULE = """
    import functools

    class Decorated:                       # what @step returns: a callable object
        def __init__(self, func):
            functools.update_wrapper(self, func)
            self.func = func

        def __call__(self, *args):
            return self.func(*args)

    @Decorated
    def helper(x):
        return x + {increment}

    def step(x):
        return helper(x) * 2
"""


def test_fingerprint_follows_decorated_helpers(tmp_path):
    def fingerprint(name, increment):
        source = WRAPPED_HELPER_MODULE.format(increment=increment)
        return code_fingerprint(load_module(tmp_path, name, source).step)

    assert fingerprint("fp_wrapped_a", 1) == fingerprint("fp_wrapped_b", 1)
    assert fingerprint("fp_wrapped_a", 1) != fingerprint("fp_wrapped_c", 2)


def test_fingerprint_tells_apart_lambdas_on_one_line():
    plus, times = (lambda x: x + 1), (lambda x: x * 2)
    assert code_fingerprint(plus) != code_fingerprint(times)


def test_fingerprint_survives_recursion_and_opaque_closures(tmp_path):
    module = load_module(tmp_path, "fp_recursive", """
        import threading
        LOCK = threading.Lock()

        def even(n):
            return True if n == 0 else odd(n - 1)

        def odd(n):
            with LOCK:
                return False if n == 0 else even(n - 1)
    """)
    assert code_fingerprint(module.even) == code_fingerprint(module.even)
    assert code_fingerprint(module.even) != code_fingerprint(module.odd)
    lock = threading.Lock()
    assert code_fingerprint(lambda: lock) == code_fingerprint(lambda: lock)


def test_fingerprint_of_partials_and_methods_includes_their_arguments():
    import functools

    def scale(df, factor):
        return df * factor

    assert code_fingerprint(functools.partial(scale, factor=2)) != code_fingerprint(
        functools.partial(scale, factor=3)
    )
    assert code_fingerprint(",".join) != code_fingerprint(";".join)


STABLE_MODULE = """
    import dataclasses

    NAMES = {"alpha", "beta", "gamma", "delta", "epsilon"}   # set order follows hash()
    MAPPING = {"x": frozenset({"p", "q", "r"}), "y": (1, 2.5, None, b"z")}

    @dataclasses.dataclass
    class Settings:
        columns: tuple = ("a", "b")
        limit: float = 0.5

    def make(settings):
        def step(df, flag=frozenset({"u", "v", "w"})):
            return [n for n in NAMES if n in MAPPING] + [settings.limit, flag]
        return step

    step = make(Settings())
"""


def test_fingerprint_is_stable_across_fresh_interpreters(tmp_path):
    (tmp_path / "fp_stable_mod.py").write_text(textwrap.dedent(STABLE_MODULE))
    code = """
        from flowyml.cache import code_fingerprint
        import fp_stable_mod
        print(code_fingerprint(fp_stable_mod.step))
    """
    first = run_python(code, hash_seed="1", cwd=tmp_path)
    second = run_python(code, hash_seed="2", cwd=tmp_path)
    here = code_fingerprint(load_module(tmp_path, "fp_stable_mod", STABLE_MODULE).step)
    assert first.strip() == second.strip() == here


def test_fingerprint_without_source_is_stable_and_sensitive():
    # `python -c` functions have no source file: the bytecode fallback decides.
    code = """
        from flowyml.cache import code_fingerprint
        WORDS = {{"a", "b", "c", "d", "e", "f"}}
        def step(x, scale=3):
            return [w * scale for w in WORDS if w in x and w not in {{"q", "r", "s", "t", "u"}}] + [{body}]
        print(code_fingerprint(step))
    """
    first = run_python(code.format(body="1"), hash_seed="3")
    second = run_python(code.format(body="1"), hash_seed="4")
    changed = run_python(code.format(body="2"), hash_seed="3")
    assert first == second
    assert first != changed


# ----------------------------------------------------------------- task_key


def test_task_key_is_deterministic_across_processes():
    code = """
        import dataclasses, pathlib, numpy as np, pandas as pd
        from flowyml.cache import task_key

        @dataclasses.dataclass
        class Options:            # defined in __main__: pickle-based tokens vary here
            names: frozenset
            limit: float = 0.5

        class Plain:
            def __init__(self):
                self.tags = {"x", "y", "z"}

        params = {
            "frame": pd.DataFrame({"a": [1, 2], "s": ["u", "v"], "c": pd.Categorical(["p", "q"])}),
            "array": np.arange(6.0).reshape(2, 3),
            "names": {"alpha", "beta", "gamma", "delta"},
            "nested": {"k": [1, (2, 3)], "when": pd.Timestamp("2024-01-01", tz="UTC")},
            "options": Options(frozenset({"m", "n", "o"})),
            "plain": Plain(),
            "path": pathlib.Path("data/x.csv"),
            "scalar": np.float32(1.5),
        }
        print(task_key("f" * 64, params, ["e" * 64, ("data/x.csv", 10, 123, 0, None)]))
    """
    assert run_python(code, hash_seed="5") == run_python(code, hash_seed="6")


def test_task_key_is_sensitive_to_params_inputs_and_code():
    frame = pd.DataFrame({"a": [1, 2, 3], "s": ["x", "y", "z"]})
    array = np.arange(4)
    identity = ("data/a.csv", 100, 1_700_000_000_000_000_000, 0, None)

    def key(fingerprint=FINGERPRINT, **overrides):
        params = {"frame": frame, "array": array, "n": 1}
        params.update(overrides.pop("params", {}))
        inputs = overrides.pop("inputs", ["b" * 64, identity])
        return task_key(fingerprint, params, inputs)

    base = key()
    assert key() == base
    assert key(params={"frame": frame.copy(), "array": array.copy()}) == base  # equal content
    assert task_key(FINGERPRINT, dict(reversed(list({"frame": frame, "array": array, "n": 1}.items()))),
                    ["b" * 64, identity]) == base  # param order does not matter
    different = [
        key(fingerprint="1" * 64),
        key(params={"n": 2}),
        key(params={"n": 1.0}),
        key(params={"frame": frame.assign(a=[1, 2, 4])}),
        key(params={"frame": frame.astype({"a": "float64"})}),
        key(params={"array": array.astype("float64")}),
        key(params={"array": np.array([0, 1, 2, 4])}),
        key(params={"extra": None}),
        key(inputs=[identity, "b" * 64]),                                 # order
        key(inputs=["c" * 64, identity]),                                 # upstream key
        key(inputs=["b" * 64, (*identity[:2], identity[2] + 1, *identity[3:])]),  # mtime
        key(inputs=["b" * 64, (*identity[:3], 0, 50)]),                   # byte range
    ]
    assert base not in different
    assert len(set(different)) == len(different)


def test_task_key_accepts_pathlike_identities():
    as_str = task_key(FINGERPRINT, {}, [("data/a.csv", 1, 2, 0, None)])
    as_path = task_key(FINGERPRINT, {}, [(pathlib.Path("data/a.csv"), 1, 2, 0, None)])
    assert as_str == as_path


def test_task_key_names_an_untokenizable_param():
    with pytest.raises(CacheError, match="param 'lock'"):
        task_key(FINGERPRINT, {"n": 1, "lock": threading.Lock()}, [])


def test_task_key_rejects_an_input_it_cannot_encode():
    with pytest.raises(CacheError, match="input 1"):
        task_key(FINGERPRINT, {}, ["a" * 64, object()])


# ---------------------------------------------------------------- round trips

FRAMES = {
    "numeric": pd.DataFrame({"i8": np.arange(5, dtype="int8"), "u64": np.arange(5, dtype="uint64"),
                             "f32": np.linspace(0, 1, 5, dtype="float32"), "b": [True, False] * 2 + [True]}),
    "strings": pd.DataFrame({"s": ["a", None, "c", "d", "e"],
                             "arrow": pd.array(["a", None, "c", "d", "e"], dtype="string[pyarrow]"),
                             "python": pd.array(["a", None, "c", "d", "e"], dtype="string[python]")}),
    "categorical": pd.DataFrame({"c": pd.Categorical(["x", "y", None, "x", "y"], categories=["y", "x", "z"]),
                                 "o": pd.Categorical([3, 1, 2, 3, 1], ordered=True)}),
    "datetimes": pd.DataFrame({"naive": pd.date_range("2024-01-01", periods=5, freq="h"),
                               "paris": pd.date_range("2024-03-31", periods=5, freq="h", tz="Europe/Paris"),
                               "seconds": pd.date_range("2024-01-01", periods=5, freq="D", unit="s"),
                               "delta": pd.to_timedelta(np.arange(5), unit="min")}),
    "nullable": pd.DataFrame({"Int64": pd.array([1, None, 3, 4, 5], dtype="Int64"),
                              "boolean": pd.array([True, None, False, True, False], dtype="boolean"),
                              "Float64": pd.array([0.5, None, 1.5, 2.5, 3.5], dtype="Float64"),
                              "arrow_int": pd.array([1, None, 3, 4, 5], dtype="int64[pyarrow]")}),
    "range_index": pd.DataFrame({"a": range(5)}, index=pd.RangeIndex(10, 20, 2, name="row")),
    "named_index": pd.DataFrame({"a": range(5)}, index=pd.Index(list("vwxyz"), name="key")),
    "datetime_index": pd.DataFrame({"a": range(5)}, index=pd.date_range("2024", periods=5, freq="D")),
    "multi_index": pd.DataFrame({"a": range(4)}, index=pd.MultiIndex.from_product([[1, 2], ["p", "q"]],
                                                                               names=["n", "l"])),
    "object_mixed": pd.DataFrame({"o": pd.Series([1, "two", 3.0, None, b"5"], dtype=object)}),
    # Parquet would turn these strings into the str dtype; the first rows do not show it.
    "object_late_strings": pd.DataFrame({"o": pd.Series([None] * 40 + ["x", "y"], dtype=object)}),
    "non_string_labels": pd.DataFrame({0: [1, 2], 1.5: [3, 4], ("t", "u"): [5, 6]}),
    "duplicate_labels": pd.DataFrame([[1, 2]], columns=["a", "a"]),
    "empty": pd.DataFrame(),
    "complex": pd.DataFrame({"z": np.arange(3) * 1j}),
    "with_attrs": pd.DataFrame({"a": [1]}).pipe(lambda f: f.attrs.update(source="unit") or f),
}


@pytest.mark.parametrize("name", sorted(FRAMES))
def test_dataframes_round_trip_exactly(cache, name):
    frame = FRAMES[name]
    cache.store(f"frame-{name}", frame)
    assert_frames_identical(cache.load(f"frame-{name}"), frame)


def test_plain_frames_are_stored_as_parquet(cache):
    # Parquet (not pickle) for what it keeps exactly: readable by any tool, portable.
    frames = {name: FRAMES[name] for name in ("numeric", "nullable", "range_index", "named_index", "multi_index")}
    frames["str_categorical"] = pd.DataFrame({"c": pd.Categorical(["x", "y", None], categories=["y", "x"])})
    for name, frame in frames.items():
        cache.store(f"pq-{name}", frame)
        assert entry_header(cache, f"pq-{name}")["format"] == "parquet", name


@pytest.mark.parametrize("series", [
    pd.Series([1.5, None, 3.0], name="price", index=pd.Index(["a", "b", "c"], name="sku")),
    pd.Series(pd.Categorical(["x", "y", "x"]), name=7),
    pd.Series(pd.date_range("2024", periods=3, tz="UTC")),
], ids=["named", "categorical", "tz"])
def test_series_round_trip_exactly(cache, series):
    cache.store("series", series)
    loaded = cache.load("series")
    pd.testing.assert_series_equal(loaded, series, check_exact=True, check_index_type=True)
    assert loaded.name == series.name


def test_other_values_round_trip(cache):
    value = {"rows": [1, 2, 3], "array": np.arange(3), "nested": ({"a"}, None)}
    cache.store("dict", value)
    loaded = cache.load("dict")
    assert loaded["rows"] == value["rows"] and loaded["nested"] == value["nested"]
    np.testing.assert_array_equal(loaded["array"], value["array"])


def test_values_holding_lambdas_round_trip(cache):
    offset = 10
    cache.store("lambda", {"transform": lambda x: x + offset, "name": "shift"})
    loaded = cache.load("lambda")
    assert loaded["name"] == "shift" and loaded["transform"](1) == 11


def test_unpicklable_value_is_refused_naming_its_type(cache):
    with pytest.raises(CacheError, match="generator"):
        cache.store("generator-value", (i for i in range(3)))
    assert not cache.contains("generator-value")
    assert cache.info()["temporary_files"] == 0


# ------------------------------------------------------------ damaged entries


def _damage_truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])


def _damage_flip_payload_byte(path):
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x01
    path.write_bytes(bytes(data))


def _damage_no_header(path):
    path.write_bytes(path.read_bytes()[:5])


def _damage_garbage_header(path):
    data = bytearray(path.read_bytes())
    data[12:30] = b"\xff{not json at all!"
    path.write_bytes(bytes(data))


def _damage_header_fields(path):
    data = path.read_bytes()
    (length,) = struct.unpack(">I", data[8:12])
    header = json.dumps({"hello": "world"}).encode()
    path.write_bytes(data[:8] + struct.pack(">I", len(header)) + header + data[12 + length:])


def _damage_empty(path):
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [
    _damage_truncate, _damage_flip_payload_byte, _damage_no_header,
    _damage_garbage_header, _damage_header_fields, _damage_empty,
], ids=lambda f: f.__name__.removeprefix("_damage_"))
@pytest.mark.parametrize("value", [FRAMES["numeric"], {"a": list(range(50))}], ids=["parquet", "pickle"])
def test_damaged_entries_raise_cache_error_and_are_replaced_by_store(cache, damage, value):
    cache.store("damaged", value)
    damage(cache.entry_path("damaged"))
    with pytest.raises(CacheError, match="damaged"):
        cache.load("damaged")
    cache.store("damaged", value)  # what the core does after recomputing
    loaded = cache.load("damaged")
    if isinstance(value, pd.DataFrame):
        assert_frames_identical(loaded, value)
    else:
        assert loaded == value


def test_missing_entry_and_entry_under_the_wrong_key(cache):
    assert isinstance(CacheError("x"), FlowymlError)
    with pytest.raises(CacheError, match="no cache entry"):
        cache.load("absent")
    cache.store("original", [1, 2])
    moved = cache.entry_path("intruder")
    moved.parent.mkdir(exist_ok=True)
    moved.write_bytes(cache.entry_path("original").read_bytes())
    with pytest.raises(CacheError, match="belongs to key"):
        cache.load("intruder")


def test_pickle_from_another_python_version_is_not_trusted(cache):
    cache.store("old-python", {"a": 1})
    path = cache.entry_path("old-python")
    data = path.read_bytes()
    (length,) = struct.unpack(">I", data[8:12])
    header = json.loads(data[12:12 + length])
    header["python"] = "2.7.18"
    encoded = json.dumps(header).encode()
    path.write_bytes(data[:8] + struct.pack(">I", len(encoded)) + encoded + data[12 + length:])
    with pytest.raises(CacheError, match=r"python 2\.7\.18"):
        cache.load("old-python")


def test_keys_that_could_escape_the_directory_are_refused(cache):
    for key in ("../../etc/passwd", "a/b/c/d", "", "ab"):
        with pytest.raises(CacheError, match="invalid cache key"):
            cache.store(key, 1)


# ------------------------------------------------------- contains/info/clear


def test_contains_discard_info_and_clear(cache):
    assert cache.info()["entries"] == 0 and cache.info()["oldest"] is None
    keys = [task_key(FINGERPRINT, {"n": n}, []) for n in range(3)]
    for n, key in enumerate(keys):
        assert not cache.contains(key)
        cache.store(key, pd.DataFrame({"n": [n] * 10}))
        assert cache.contains(key)
    info = cache.info()
    assert info["entries"] == 3
    assert info["total_bytes"] == sum(cache.entry_path(key).stat().st_size for key in keys)
    assert info["directory"] == str(cache.directory)
    assert info["oldest"] <= info["newest"]
    assert info["newest"].tzinfo is not None

    cache.discard(keys[0])
    cache.discard(keys[0])  # discarding twice is fine
    assert not cache.contains(keys[0]) and cache.info()["entries"] == 2

    foreign = cache.directory / "notes.txt"
    foreign.write_text("not ours")
    assert cache.clear() == 2
    assert cache.info()["entries"] == 0
    assert not any(cache.contains(key) for key in keys)
    assert foreign.read_text() == "not ours"


def test_leftover_temp_file_is_ignored_then_cleared(cache):
    key = task_key(FINGERPRINT, {"left": "over"}, [])
    leftover = cache.entry_path(key).with_name(f"{key}.4242.deadbeef.tmp")
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"FLOWYMLC half a write")  # what a killed writer leaves
    assert not cache.contains(key)
    with pytest.raises(CacheError):
        cache.load(key)
    assert cache.info()["entries"] == 0 and cache.info()["temporary_files"] == 1
    cache.store(key, "whole")
    assert cache.load(key) == "whole"
    assert cache.clear() == 1
    assert not leftover.exists() and cache.info()["temporary_files"] == 0


def test_cache_is_picklable_and_directory_is_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = Cache("relative/cache")
    assert cache.directory == tmp_path / "relative" / "cache" and cache.directory.is_dir()
    clone = pickle.loads(pickle.dumps(cache))
    assert clone == cache and clone.directory == cache.directory
    cache.store("shared", [1, 2, 3])
    assert clone.load("shared") == [1, 2, 3]


def test_a_file_in_the_way_of_the_directory_is_a_clear_error(tmp_path):
    (tmp_path / "taken").write_text("")
    with pytest.raises(CacheError, match="not a directory"):
        Cache(tmp_path / "taken")


def test_default_cache_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("FLOWYML_CACHE_DIR", raising=False)
    assert default_cache_dir() is None
    monkeypatch.setenv("FLOWYML_CACHE_DIR", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    assert default_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert default_cache_dir("~/c") == pathlib.Path.home() / "c"


# ------------------------------------------------------ concurrent processes

SHARED_KEY = "c0ffee" * 8
WRITES_PER_WRITER = 25


def frame_of(writer: int) -> pd.DataFrame:
    """The frame writer ``writer`` stores: big enough that writes take a while."""
    rng = np.random.default_rng(writer + 1)
    return pd.DataFrame({"writer": np.full(40_000, writer), "value": rng.random(40_000),
                         "label": pd.Categorical(rng.choice(["a", "b", "c"], 40_000))})


def _writer(cache: Cache, writer: int, start: multiprocessing.synchronize.Barrier, results) -> None:
    frame = frame_of(writer)
    start.wait()
    for _ in range(WRITES_PER_WRITER):
        cache.store(SHARED_KEY, frame)
    results.put(("writer", writer, WRITES_PER_WRITER))


def _reader(cache: Cache, start, writers_done, results) -> None:
    expected = {writer: frame_of(writer) for writer in (-1, 0, 1)}
    loads, problems, seen = 0, [], set()
    start.wait()
    while not writers_done.is_set() or (loads == 0 and len(problems) < 50):
        try:
            frame = cache.load(SHARED_KEY)
        except Exception as exc:  # a half-written entry would land here
            problems.append(f"{type(exc).__name__}: {exc}")
            continue
        writer = int(frame["writer"].iloc[0])
        try:
            assert_frames_identical(frame, expected[writer])
        except (AssertionError, KeyError) as exc:
            problems.append(f"mixed or wrong frame: {exc}")
        seen.add(writer)
        loads += 1
    results.put(("reader", loads, problems, sorted(seen)))


def test_concurrent_writers_and_readers_never_see_a_broken_entry(tmp_path):
    context = multiprocessing.get_context("spawn")
    cache = Cache(tmp_path / "shared")
    cache.store(SHARED_KEY, frame_of(-1))  # readers start on an existing entry
    start, writers_done, results = context.Barrier(4), context.Event(), context.Queue()
    writers = [context.Process(target=_writer, args=(cache, w, start, results)) for w in (0, 1)]
    readers = [context.Process(target=_reader, args=(cache, start, writers_done, results)) for _ in range(2)]
    for process in writers + readers:
        process.start()
    reports = [results.get(timeout=120) for _ in writers]
    writers_done.set()
    reports += [results.get(timeout=120) for _ in readers]
    for process in writers + readers:
        process.join(timeout=60)
        assert process.exitcode == 0

    assert sorted(r[1] for r in reports if r[0] == "writer") == [0, 1]
    for _, loads, problems, seen in (r for r in reports if r[0] == "reader"):
        assert problems == []
        assert loads > 0 and set(seen) <= {-1, 0, 1}
    final = cache.load(SHARED_KEY)  # last writer wins, whole
    assert_frames_identical(final, frame_of(int(final["writer"].iloc[0])))
    assert int(final["writer"].iloc[0]) in (0, 1)
    assert cache.info() | {"oldest": None, "newest": None} == {
        "directory": str(cache.directory), "entries": 1, "oldest": None, "newest": None,
        "total_bytes": cache.entry_path(SHARED_KEY).stat().st_size, "temporary_files": 0,
    }
