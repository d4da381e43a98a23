"""Census-Income: spec, loader, bundled sample, downloader (file:// URLs)."""
import gzip
import hashlib
import os
import shutil
from pathlib import Path

import pytest

from features import census
from features.census import (CENSUS_COLUMNS, CENSUS_SAMPLE_PATH, DownloadError, census_spec, download_census,
                             read_census)
from features.io import DataError
from features.spec import CategoricalFeature, NumericFeature, load_dataset_spec

FULL_TEST_FILE = "/work/shared/data/census-income/census-income.test.gz"
CONFIGS = Path(census.__file__).parent / "configs"


def test_columns_match_readme_order():
    assert len(CENSUS_COLUMNS) == 42
    assert CENSUS_COLUMNS[:5] == ("age", "class_worker", "det_ind_code", "det_occ_code", "education")
    assert CENSUS_COLUMNS[24] == "instance_weight" and CENSUS_COLUMNS[-1] == "income_50k"


@pytest.mark.parametrize("group, tasks", [(1, ["income", "marital"]), (2, ["education", "marital"])])
def test_census_spec_groups(group, tasks):
    spec = census_spec(group)
    assert spec.task_names == tasks
    names = set(spec.feature_names)
    # Label sources and the survey weight are never inputs, in both groups (as in the paper).
    assert names.isdisjoint({"education", "marital_stat", "income_50k", "instance_weight"})
    assert len(names) == 42 - 4
    assert spec.weight_column == "instance_weight"
    assert spec.feature("capital_gains") == NumericFeature("capital_gains", log=True, also_bucketize=64,
                                                           zero_bucket=True)
    assert spec.feature("age") == NumericFeature("age", also_bucketize=64)
    # Every numeric quantity also feeds its quantile bucket id; codes and labels do not.
    numeric = [f.name for f in spec.features if isinstance(f, NumericFeature)]
    assert len(numeric) == 7
    assert set(spec.input_names) == names | {f"{n}_bucket" for n in numeric}
    assert isinstance(spec.feature("det_ind_code"), CategoricalFeature)  # a code, not a quantity
    assert isinstance(spec.feature("year"), CategoricalFeature)


def test_census_spec_bad_group():
    with pytest.raises(ValueError, match="unknown census task group 3"):
        census_spec(3)


@pytest.mark.parametrize("group", [1, 2])
def test_yaml_configs_match_python_spec(group):
    assert load_dataset_spec(CONFIGS / f"census_group{group}.yaml") == census_spec(group)


def test_sample_integrity():
    raw = gzip.open(CENSUS_SAMPLE_PATH, "rb").read()
    assert os.path.getsize(CENSUS_SAMPLE_PATH) < 1_000_000
    lines = raw.splitlines()
    assert len(lines) == 10_000
    assert all(l.endswith(b".") and l.count(b",") == 41 for l in lines)  # original UCI format
    df = read_census(CENSUS_SAMPLE_PATH)
    assert list(df.columns) == list(CENSUS_COLUMNS) and len(df) == 10_000
    counts = df["income_50k"].value_counts().to_dict()
    assert counts == {"- 50000": 9430, "50000+": 570}  # both labels, period stripped
    assert (df["marital_stat"] == "Never married").sum() > 1000
    first = df.iloc[0]
    assert first["age"] == 23 and first["education"] == "Bachelors degree(BA AB BS)"
    assert first["instance_weight"] == pytest.approx(3513.97)
    assert first["det_ind_code"] == "45"  # codes stay strings
    assert (df["mig_chg_msa"] == "?").any()  # '?' kept as a category
    assert not df["citizenship"].str.endswith(" ").any()  # trailing space in the raw file is stripped


def test_read_plain_and_gzip_agree(tmp_path):
    plain = tmp_path / "sample.data"  # plain text whatever the name
    plain.write_bytes(gzip.open(CENSUS_SAMPLE_PATH, "rb").read())
    a = read_census(plain, task_group=2)
    b = read_census(CENSUS_SAMPLE_PATH, task_group=2)
    assert a.equals(b)


def test_corrupted_census_label_is_reported(tmp_path):
    lines = gzip.open(CENSUS_SAMPLE_PATH, "rb").read().splitlines(keepends=True)[:5]
    lines[3] = lines[3].replace(b"- 50000.", b"- 5000O.")
    path = tmp_path / "bad.gz"
    with gzip.open(path, "wb") as fh:
        fh.writelines(lines)
    with pytest.raises(DataError) as e:
        read_census(path)
    assert "'income_50k'" in str(e.value) and "line 4: '- 5000O'" in str(e.value)


# -- download -------------------------------------------------------------------------------


def _file_url(directory: Path) -> str:
    return directory.resolve().as_uri() + "/"


@pytest.fixture
def mirror(tmp_path):
    """A local 'UCI mirror' with a small fake training file (row-count checked)."""
    src = tmp_path / "mirror"
    src.mkdir()
    rows = gzip.open(CENSUS_SAMPLE_PATH, "rb").read().splitlines(keepends=True)[:50]
    with gzip.open(src / census.TRAIN_FILE, "wb") as fh:
        fh.writelines(rows)
    return src


def test_download_by_row_count_records_sha_and_uses_cache(tmp_path, mirror):
    cache = tmp_path / "cache"
    got = download_census(cache, base_url=_file_url(mirror), files=[census.TRAIN_FILE],
                          expected_rows={census.TRAIN_FILE: 50}, progress=None)
    path = Path(got[census.TRAIN_FILE])
    assert path.read_bytes() == (mirror / census.TRAIN_FILE).read_bytes()
    recorded = (cache / (census.TRAIN_FILE + ".sha256")).read_text().split()[0]
    assert recorded == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not [p for p in cache.iterdir() if p.name.endswith(".part")]
    # Cached: works with the source gone.
    shutil.rmtree(mirror)
    again = download_census(cache, base_url=_file_url(mirror), files=[census.TRAIN_FILE],
                            expected_rows={census.TRAIN_FILE: 50}, progress=None)
    assert again == got


def test_download_wrong_row_count_is_rejected(tmp_path, mirror):
    cache = tmp_path / "cache"
    # Default expectation: the real 199,523 rows; the 50-row fake must be rejected and removed.
    with pytest.raises(DownloadError, match="50 rows != expected 199523"):
        download_census(cache, base_url=_file_url(mirror), files=[census.TRAIN_FILE], progress=None)
    assert list(cache.iterdir()) == []


@pytest.mark.skipif(not os.path.exists(FULL_TEST_FILE), reason="full UCI test file not on this machine")
def test_download_real_test_file_checks_sha256(tmp_path):
    src = tmp_path / "mirror"
    src.mkdir()
    shutil.copy(FULL_TEST_FILE, src / census.TEST_FILE)
    cache = tmp_path / "cache"
    got = download_census(cache, base_url=_file_url(src), files=[census.TEST_FILE], progress=None)
    assert Path(got[census.TEST_FILE]).stat().st_size == os.path.getsize(FULL_TEST_FILE)
    # A cached file that went bad is fetched again.
    Path(got[census.TEST_FILE]).write_bytes(b"garbage")
    download_census(cache, base_url=_file_url(src), files=[census.TEST_FILE], progress=None)
    assert hashlib.sha256(Path(got[census.TEST_FILE]).read_bytes()).hexdigest() == census.KNOWN_SHA256[census.TEST_FILE]


def test_download_corrupted_file_fails_and_leaves_nothing(tmp_path):
    src = tmp_path / "mirror"
    src.mkdir()
    data = bytearray(open(CENSUS_SAMPLE_PATH, "rb").read())
    data[len(data) // 2] ^= 0xFF  # flip a byte
    (src / census.TEST_FILE).write_bytes(bytes(data))
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError) as e:
        download_census(cache, base_url=_file_url(src), files=[census.TEST_FILE], progress=None)
    assert "sha256" in str(e.value) and census.KNOWN_SHA256[census.TEST_FILE] in str(e.value)
    assert list(cache.iterdir()) == []


def test_download_missing_source(tmp_path):
    with pytest.raises(DownloadError, match="cannot download"):
        download_census(tmp_path / "cache", base_url=_file_url(tmp_path), files=[census.TEST_FILE], progress=None)


@pytest.mark.skipif(not os.path.exists(FULL_TEST_FILE), reason="full UCI test file not on this machine")
def test_make_sample_is_deterministic(tmp_path):
    from features.make_sample import make_sample

    out = tmp_path / "sample.gz"
    make_sample(FULL_TEST_FILE, str(out))
    assert out.read_bytes() == open(CENSUS_SAMPLE_PATH, "rb").read()


@pytest.mark.parametrize("group", [1, 2])
def test_benchmark_plain_configs_are_the_census_spec_without_bucket_ids(group):
    # benchmarks/census_quality.py's tables are trained on arrays exported with these configs; if the census
    # spec gains a feature, they must follow (and the benchmark's input fingerprint changes).
    import dataclasses

    from features.spec import NumericFeature

    spec = census_spec(group)
    plain = dataclasses.replace(spec, features=tuple(
        dataclasses.replace(f, also_bucketize=None, zero_bucket=False) if isinstance(f, NumericFeature) else f
        for f in spec.features))
    loaded = load_dataset_spec(CONFIGS.parent.parent / "benchmarks" / "configs" / f"census_plain_g{group}.yaml")
    assert loaded == plain
    assert not any(n.endswith("_bucket") for n in loaded.input_names)
