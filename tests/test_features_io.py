"""read_dataset validation (DataError messages) and splits."""
import gzip

import numpy as np
import pandas as pd
import pytest

from features.io import DataError, paper_split, read_dataset, split_frame
from features.spec import CategoricalFeature, DatasetSpec, NumericFeature, Task

HEADER = "user_id,country,age,clicked,watch_time"


def spec(header=True, **overrides):
    kwargs = dict(
        name="toy", columns=("user_id", "country", "age", "clicked", "watch_time"),
        features=[CategoricalFeature("country"), NumericFeature("age")],
        tasks=[Task("clicked", "binary", "clicked", positive=["yes"], values=["yes", "no"]),
               Task("watch", "regression", "watch_time")],
        header=header, na_values=("?", "NA"))
    kwargs.update(overrides)
    return DatasetSpec(**kwargs)


def write(tmp_path, text, name="data.csv", gz=False):
    path = tmp_path / name
    if gz:
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return str(path)


GOOD = HEADER + "\nu1, fr ,30,yes,1.5\nu2,?,NA,no,0\n\nu3,de,41,no,2\n"


def test_reads_and_converts(tmp_path):
    df = read_dataset(write(tmp_path, GOOD), spec())
    assert list(df.columns) == ["user_id", "country", "age", "clicked", "watch_time"]
    assert len(df) == 3  # the blank line is skipped
    assert df["country"].tolist() == ["fr", "?", "de"]  # stripped; '?' stays a category
    assert df["age"].dtype == np.float64 and np.isnan(df["age"][1]) and df["age"][2] == 41
    assert df["watch_time"].tolist() == [1.5, 0.0, 2.0]


def test_gzip_detected_by_content_not_extension(tmp_path):
    path = write(tmp_path, GOOD, name="data.csv", gz=True)  # gzip bytes under a .csv name
    assert read_dataset(path, spec())["country"].tolist() == ["fr", "?", "de"]


def test_several_files_concatenate(tmp_path):
    a = write(tmp_path, GOOD, "a.csv")
    b = write(tmp_path, GOOD, "b.csv.gz", gz=True)
    df = read_dataset([a, b], spec())
    assert len(df) == 6 and list(df.index) == list(range(6))


def test_header_missing_column(tmp_path):
    path = write(tmp_path, "user_id,country,age,watch_time\nu,fr,3,1\n")
    with pytest.raises(DataError) as e:
        read_dataset(path, spec())
    assert path in str(e.value) and "lacks column(s) ['clicked']" in str(e.value)


def test_headerless_wrong_field_count_names_line(tmp_path):
    path = write(tmp_path, "u1,fr,30,yes,1\nu2,fr,30,yes,1\nu3,fr,30,yes\n")
    with pytest.raises(DataError) as e:
        read_dataset(path, spec(header=False))
    assert f"{path}: line 3: expected 5 fields" in str(e.value) and "found 4" in str(e.value)


def test_too_many_fields_on_first_line(tmp_path):
    path = write(tmp_path, "u1,fr,30,yes,1,extra\nu2,fr,30,yes,1\n")
    with pytest.raises(DataError, match="line 1: expected 5 fields"):
        read_dataset(path, spec(header=False))


def test_non_numeric_value_names_column_line_value(tmp_path):
    path = write(tmp_path, HEADER + "\nu1,fr,30,yes,1\nu2,fr,thirty,no,1\n")
    with pytest.raises(DataError) as e:
        read_dataset(path, spec())
    message = str(e.value)
    assert path in message and "'age'" in message and "line 3: 'thirty'" in message


def test_empty_file(tmp_path):
    with pytest.raises(DataError, match="no data rows"):
        read_dataset(write(tmp_path, ""), spec(header=False))
    with pytest.raises(DataError, match="no data rows after the header"):
        read_dataset(write(tmp_path, HEADER + "\n\n", name="h.csv"), spec())
    with pytest.raises(DataError, match="empty file"):
        read_dataset(write(tmp_path, "", name="e.csv"), spec())


def test_unexpected_label_value(tmp_path):
    path = write(tmp_path, HEADER + "\nu1,fr,30,yes,1\nu2,fr,31,no,1\nu3,fr,32,maybe,1\n")
    with pytest.raises(DataError) as e:
        read_dataset(path, spec())
    message = str(e.value)
    assert "'clicked'" in message and "line 4: 'maybe'" in message and "allowed values: ['yes', 'no']" in message


def test_regression_label_must_be_numeric_and_present(tmp_path):
    with pytest.raises(DataError,
                       match=r"'watch_time' \(label of task 'watch'\) has non-numeric value\(s\): line 2: 'long'"):
        read_dataset(write(tmp_path, HEADER + "\nu1,fr,30,yes,long\n"), spec())
    with pytest.raises(DataError, match=r"'watch_time' .* missing value\(s\): line 2: '\?'"):
        read_dataset(write(tmp_path, HEADER + "\nu1,fr,30,yes,?\n", name="m.csv"), spec())


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_dataset("/nonexistent/nope.csv", spec())


def test_error_lists_a_few_examples(tmp_path):
    rows = "".join(f"u{i},fr,x{i},yes,1\n" for i in range(6))
    with pytest.raises(DataError, match=r"\(and 3 more\)"):
        read_dataset(write(tmp_path, HEADER + "\n" + rows), spec())


def test_split_frame_is_seeded_disjoint_and_complete():
    df = pd.DataFrame({"i": range(1000)})
    a = split_frame(df, (0.6, 0.2, 0.2), seed=3)
    b = split_frame(df, (0.6, 0.2, 0.2), seed=3)
    c = split_frame(df, (0.6, 0.2, 0.2), seed=4)
    assert [len(x) for x in a] == [600, 200, 200]
    assert all(x.equals(y) for x, y in zip(a, b))
    assert not a[0].equals(c[0])
    ids = np.concatenate([x["i"].to_numpy() for x in a])
    assert sorted(ids) == list(range(1000))
    assert not np.array_equal(a[0]["i"].to_numpy(), np.arange(600))  # actually shuffled, not a head slice
    with pytest.raises(ValueError, match="summing to 1"):
        split_frame(df, (0.5, 0.2))


def test_paper_split():
    train = pd.DataFrame({"i": range(10)})
    test = pd.DataFrame({"i": range(100, 201)})
    tr, va, te = paper_split(train, test, seed=0)
    assert tr.equals(train)
    assert len(va) == 50 and len(te) == 51
    assert set(va["i"]).isdisjoint(te["i"]) and set(va["i"]) | set(te["i"]) == set(test["i"])


def test_values_past_float32_are_refused_before_they_become_inf(tmp_path):
    path = write(tmp_path, HEADER + "\nu1,fr,31,yes,2.0\nu2,de,4e38,no,1.5\n")
    with pytest.raises(DataError, match=r"'age'.*float32.*line 3: '4e38'"):
        read_dataset(path, spec())
    assert read_dataset(write(tmp_path, HEADER + "\nu1,fr,3e38,yes,2.0\n", "ok.csv"), spec())["age"][0] == 3e38


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbf" + (HEADER + "\nu1,fr,31,yes,2.0\n").encode())
    assert list(read_dataset(path, spec())["age"]) == [31.0]


def test_a_binary_file_is_named_as_one(tmp_path):
    path = tmp_path / "model.keras"
    path.write_bytes(b'PK\x03\x04\x00\x00"x",y\n' * 3)
    with pytest.raises(DataError, match="model.keras: holds NUL bytes"):
        read_dataset(path, spec())


def test_a_header_line_in_a_headerless_file_is_named_as_one(tmp_path):
    path = write(tmp_path, HEADER + "\nu1,fr,31,yes,2.0\n")
    with pytest.raises(DataError, match=r"line 1 is a header \(user_id, country, age, clicked, \.\.\.\).*header: false"):
        read_dataset(path, spec(header=False))
