"""The UCI Census-Income (KDD) data set as used by the MMoE paper.

Ma et al. (KDD 2018, section 6.3) build two groups of two tasks from the
1994-1995 Current Population Survey extract:

* group 1: income > $50K (`income`) and marital status "Never married"
  (`marital`);
* group 2: education at least college (`education`) and `marital`.

In both groups education and marital status are removed from the inputs (as
in the paper), and so is the income column.  `instance_weight` is a survey
sampling weight that UCI says not to use as an input; it is the spec's weight
column instead.

Files: the training file census-income.data.gz (199,523 rows) and the test
file census-income.test.gz (99,762 rows), both headerless, 42 fields, each
value after a ", " and each row ending in ".".  `download_census` fetches
and verifies them; `CENSUS_SAMPLE_PATH` is a small bundled sample of the test
file in the original format (see features/data/README.md).
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Union

import pandas as pd

from features.io import PathLike, is_gzip, read_dataset
from features.spec import CategoricalFeature, DatasetSpec, NumericFeature, Task

# The 42 fields in file order, with the names MMoE reproductions use.
CENSUS_COLUMNS = (
    "age", "class_worker", "det_ind_code", "det_occ_code", "education", "wage_per_hour", "hs_college",
    "marital_stat", "major_ind_code", "major_occ_code", "race", "hisp_origin", "sex", "union_member",
    "unemp_reason", "full_or_part_emp", "capital_gains", "capital_losses", "stock_dividends",
    "tax_filer_stat", "region_prev_res", "state_prev_res", "det_hh_fam_stat", "det_hh_summ",
    "instance_weight", "mig_chg_msa", "mig_chg_reg", "mig_move_reg", "mig_same", "mig_prev_sunbelt",
    "num_emp", "fam_under_18", "country_father", "country_mother", "country_self", "citizenship",
    "own_or_self", "vet_question", "vet_benefits", "weeks_worked", "year", "income_50k",
)

WEIGHT_COLUMN = "instance_weight"

# Numeric columns that are real quantities: z-scored.  Money amounts are
# heavy-tailed (mostly 0, a few up to 99,999), so they are log1p'd first;
# otherwise a handful of rows dominate the scale and the rest collapse to ~0.
NUMERIC_COLUMNS = ("age", "wage_per_hour", "capital_gains", "capital_losses", "stock_dividends",
                   "num_emp", "weeks_worked")
LOG_COLUMNS = ("wage_per_hour", "capital_gains", "capital_losses", "stock_dividends")
# Each numeric column also feeds its 64-quantile bucket id (`also_bucketize`): the network sees both the value
# and a learned embedding of its range, which trees get for free by splitting.  On the census benchmark
# (BENCHMARKS.md, protocol b, seed 0, otherwise equal settings) this took MMoE's test AUC from 0.9436 to 0.9444
# (income) and from 0.8873 to 0.8919 (education); bucket ids alone, without the value, were worse (-0.009).
NUMERIC_BUCKETS = 64
# The money amounts are mostly exactly 0, so their 64 plain quantiles collapse to 3-8 distinct ids; with 0 as its
# own bucket and the quantiles taken over the non-zero amounts they get 41-53.  On the benchmark (group 1, seed 0,
# validation) this was the largest single gain of the search: income AUC 0.9427 -> 0.9466.
ZERO_BUCKET_COLUMNS = LOG_COLUMNS
# Numeric-looking columns that are really codes (industry/occupation recodes,
# self-employment status, veterans' benefits status, survey year): a
# vocabulary, since their numeric order means nothing.
CODE_COLUMNS = ("det_ind_code", "det_occ_code", "own_or_self", "vet_benefits", "year")

# Label values as they read after stripping the leading space and the
# row-ending period ("50000+." -> "50000+").
INCOME_VALUES = ("- 50000", "50000+")
MARITAL_VALUES = (
    "Never married", "Married-civilian spouse present", "Married-spouse absent", "Separated", "Divorced",
    "Widowed", "Married-A F spouse present",
)
EDUCATION_VALUES = (
    "Children", "Less than 1st grade", "1st 2nd 3rd or 4th grade", "5th or 6th grade", "7th and 8th grade",
    "9th grade", "10th grade", "11th grade", "12th grade no diploma", "High school graduate",
    "Some college but no degree", "Associates degree-occup /vocational", "Associates degree-academic program",
    "Bachelors degree(BA AB BS)", "Masters degree(MA MS MEng MEd MSW MBA)",
    "Prof school degree (MD DDS DVM LLB JD)", "Doctorate degree(PhD EdD)",
)
# "Education at least college" is read as "holds a completed college degree":
# both associate degrees and everything from a bachelor's up.  The paper does
# not list its set; the other common reading also counts "Some college but no
# degree" (attended college), which raises the positive rate from ~19% to
# ~33% of the rows in the test file.
COLLEGE_VALUES = (
    "Associates degree-occup /vocational", "Associates degree-academic program", "Bachelors degree(BA AB BS)",
    "Masters degree(MA MS MEng MEd MSW MBA)", "Prof school degree (MD DDS DVM LLB JD)",
    "Doctorate degree(PhD EdD)",
)

TASK_GROUPS = (1, 2)

# Source and integrity data for download_census.
UCI_BASE_URL = "https://archive.ics.uci.edu/ml/machine-learning-databases/census-income-mld/"
TRAIN_FILE = "census-income.data.gz"
TEST_FILE = "census-income.test.gz"
CENSUS_FILES = (TRAIN_FILE, TEST_FILE)
# sha256 of the files as published by UCI.  Only the test file's is known
# here (checked against a copy of it); the training file is checked by its
# row count and field count instead, and the sha256 of the first good
# download is recorded next to it (<file>.sha256) so later runs check the
# cached copy byte for byte.
KNOWN_SHA256 = {TEST_FILE: "5ac4cacd3ca9f1ecb10de1a0a41e4ac68fdc419e3fec190f5c0c6cc03b2ea659"}
KNOWN_ROWS = {TRAIN_FILE: 199_523, TEST_FILE: 99_762}

_DATA_DIR = Path(__file__).resolve().parent / "data"
# Seeded random sample of the test file in the original format (features/make_sample.py).
CENSUS_SAMPLE_PATH = str(_DATA_DIR / "census-income.sample.gz")


class DownloadError(RuntimeError):
    """A download failed or did not match its expected checksum / row count."""


def census_spec(task_group: int = 1) -> DatasetSpec:
    """DatasetSpec for the MMoE paper's Census-Income task group 1 or 2."""
    if task_group not in TASK_GROUPS:
        raise ValueError(f"unknown census task group {task_group!r}; expected one of {list(TASK_GROUPS)}")
    # Label sources are never inputs, in both groups, as in the paper.
    excluded = {"education", "marital_stat", "income_50k", WEIGHT_COLUMN}
    features = []
    for column in CENSUS_COLUMNS:
        if column in excluded:
            continue
        if column in NUMERIC_COLUMNS:
            features.append(NumericFeature(column, log=column in LOG_COLUMNS, also_bucketize=NUMERIC_BUCKETS,
                                           zero_bucket=column in ZERO_BUCKET_COLUMNS))
        else:
            features.append(CategoricalFeature(column))
    marital = Task("marital", "binary", "marital_stat", positive=["Never married"], values=MARITAL_VALUES)
    if task_group == 1:
        tasks = [Task("income", "binary", "income_50k", positive=["50000+"], values=INCOME_VALUES), marital]
    else:
        tasks = [Task("education", "binary", "education", positive=COLLEGE_VALUES, values=EDUCATION_VALUES),
                 marital]
    return DatasetSpec(
        name=f"census_group{task_group}",
        columns=CENSUS_COLUMNS,
        features=features,
        tasks=tasks,
        weight_column=WEIGHT_COLUMN,
        header=False,
        delimiter=",",
        na_values=("?",),
        strip_trailing_period=True,
    )


def read_census(paths: Union[PathLike, Sequence[PathLike]], task_group: int = 1) -> pd.DataFrame:
    """Read UCI Census-Income files (gzip or plain) into a validated frame.

    Values are stripped of the leading space and the row-ending period; the
    numeric columns are floats, all other columns strings.  Raises
    features.io.DataError on a malformed file.
    """
    return read_dataset(paths, census_spec(task_group))


# -- download -------------------------------------------------------------------------


def sha256_file(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _count_rows(path: PathLike) -> int:
    """Rows with the 42 Census fields; raises DownloadError on any other line."""
    opener = gzip.open if is_gzip(path) else open
    rows = 0
    try:
        with opener(path, "rb") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                fields = line.count(b",") + 1
                if fields != len(CENSUS_COLUMNS):
                    raise DownloadError(f"{path}: line {number} has {fields} fields, expected {len(CENSUS_COLUMNS)}")
                rows += 1
    except (OSError, EOFError) as e:
        raise DownloadError(f"{path}: unreadable (truncated or not gzip?): {e}") from None
    return rows


def _verify(path: Path, name: str, sha256: Optional[str], rows: Optional[int]) -> Optional[str]:
    """None if `path` passes the checks for `name`, else a description of the mismatch."""
    recorded = path.with_name(path.name + ".sha256")
    if sha256 is None and recorded.exists():
        sha256 = recorded.read_text().split()[0]
    if sha256 is not None:
        actual = sha256_file(path)
        return None if actual == sha256 else f"sha256 {actual} != expected {sha256}"
    if rows is not None:
        try:
            actual_rows = _count_rows(path)
        except DownloadError as e:
            return str(e)
        if actual_rows != rows:
            return f"{actual_rows} rows != expected {rows}"
        return None
    return None  # nothing known to check against


def download_census(cache_dir: PathLike, base_url: str = UCI_BASE_URL, files: Sequence[str] = CENSUS_FILES,
                    expected_sha256: Optional[Mapping[str, str]] = None,
                    expected_rows: Optional[Mapping[str, int]] = None, timeout: float = 120.0,
                    progress=print) -> Dict[str, str]:
    """Fetch the Census files into `cache_dir` and verify them; returns {file name: local path}.

    A cached file that passes verification is not fetched again.  Each file is
    downloaded to a temporary name and renamed only after it passes, so an
    interrupted or corrupt download never poses as a good cached copy.  A file
    is checked by sha256 when one is known (`KNOWN_SHA256`, overridable with
    `expected_sha256`), otherwise by its row count (`KNOWN_ROWS` /
    `expected_rows`, each row having the 42 fields); the sha256 of a file
    checked by row count is recorded next to it for later runs.  Any URL
    urllib understands works, including file:// ones.
    """
    sha_table = {**KNOWN_SHA256, **(expected_sha256 or {})}
    row_table = {**KNOWN_ROWS, **(expected_rows or {})}
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in files:
        target = cache / name
        recorded = target.with_name(target.name + ".sha256")
        if target.exists():
            problem = _verify(target, name, sha_table.get(name), row_table.get(name))
            if problem is None:
                out[name] = str(target)
                continue
            if progress:
                progress(f"cached {target} is invalid ({problem}); downloading again")
            target.unlink()
            recorded.unlink(missing_ok=True)
        url = base_url.rstrip("/") + "/" + name
        if progress:
            progress(f"downloading {url}")
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=cache)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as sink:
                try:
                    with urllib.request.urlopen(url, timeout=timeout) as response:
                        shutil.copyfileobj(response, sink, 1 << 20)
                except (urllib.error.URLError, OSError) as e:
                    raise DownloadError(f"cannot download {url}: {e}") from None
            # Verify the temporary file against the tables only (never against a stale record).
            sha = sha_table.get(name)
            problem = _verify(tmp, name, sha, row_table.get(name))
            if problem is not None:
                raise DownloadError(f"downloaded {url} does not match: {problem}; the file was deleted")
            os.replace(tmp, target)
            if sha is None:
                recorded.write_text(f"{sha256_file(target)}  {name}\n")
        finally:
            tmp.unlink(missing_ok=True)
        out[name] = str(target)
    return out
