"""A non-Census data set described only by a YAML config, end to end (Beam run, marked slow)."""
import textwrap

import numpy as np
import pandas as pd
import pytest

from features.io import read_dataset
from features.spec import WEIGHT_KEY, load_dataset_spec

CONFIG = """
name: clicks
columns: [user_id, country, age, clicks, score, clicked, watch_time, notes]
header: true
na_values: ["", "NA"]
drop_columns: [notes]
features:
  - {name: user_id, type: hashed, hash_buckets: 64}
  - {name: country, type: categorical, top_k: 2}
  - {name: age, type: numeric}
  - {name: clicks, type: numeric, log: true}
  - {name: score, type: numeric, bucketize: 4}
tasks:
  - {name: clicked, kind: binary, column: clicked, positive: ["yes"], values: ["yes", "no"]}
  - {name: watch_time, kind: regression, column: watch_time}
"""


def make_csv(path, n=400, seed=0):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "user_id": [f"user{i % 97}" for i in range(n)],
        "country": rng.choice(["us", "fr", "de"], size=n, p=[0.6, 0.3, 0.1]),
        "age": rng.integers(18, 80, size=n).astype(str),
        "clicks": rng.poisson(3, size=n).astype(str),
        "score": np.round(rng.uniform(0, 1, size=n), 4).astype(str),
        "clicked": rng.choice(["yes", "no"], size=n),
        "watch_time": np.round(rng.exponential(5, size=n), 3).astype(str),
        "notes": "free text",
    })
    df.loc[[5, 17], "age"] = "NA"
    df.to_csv(path, index=False)
    return df


@pytest.mark.slow
def test_yaml_config_end_to_end(tmp_path):
    from features.transform import transform_in_process, transformed_feature_info

    config = tmp_path / "clicks.yaml"
    config.write_text(textwrap.dedent(CONFIG))
    spec = load_dataset_spec(config)
    raw = make_csv(tmp_path / "clicks.csv")
    df = read_dataset(tmp_path / "clicks.csv", spec)
    assert "notes" not in df.columns and df["age"].isna().sum() == 2
    train, test = df.iloc[:300].reset_index(drop=True), df.iloc[300:].reset_index(drop=True)
    tft_output, arrays = transform_in_process(spec, train, {"test": test}, str(tmp_path / "tft"), progress=None)

    info = {d["name"]: d for d in transformed_feature_info(spec, tft_output)}
    assert info["user_id"] == {"name": "user_id", "kind": "categorical", "vocab_size": 64}
    assert info["country"]["vocab_size"] == 3  # top_k=2 plus one OOV bucket
    assert info["score"] == {"name": "score", "kind": "categorical", "vocab_size": 4}
    assert info["age"]["kind"] == info["clicks"]["kind"] == "numeric"

    tr = arrays["train"]
    # top_k keeps the two most frequent countries (us, fr); de goes to the OOV id 2.
    country = train["country"].to_numpy()
    assert (tr["country"][country == "us"] == 0).all() and (tr["country"][country == "fr"] == 1).all()
    assert (tr["country"][country == "de"] == 2).all()
    # Hashing is deterministic: same user, same bucket; ids within range.
    assert tr["user_id"].max() < 64 and tr["user_id"].min() >= 0
    assert tr["user_id"][0] == tr["user_id"][97]
    # Quantile buckets split the training scores into 4 roughly equal groups, monotone in the score.
    counts = np.bincount(tr["score"], minlength=4)
    assert counts.min() > 50, counts
    order = np.argsort(train["score"].to_numpy())
    assert (np.diff(tr["score"][order]) >= 0).all()
    # NaN age -> training mean -> 0; z-score over the present values.
    present = train["age"].dropna().to_numpy()
    assert np.allclose(tr["age"][train["age"].isna().to_numpy()], 0.0, atol=1e-5)
    np.testing.assert_allclose(tr["age"][~train["age"].isna().to_numpy()],
                               (present - present.mean()) / present.std(), atol=1e-4)
    clicks = np.log1p(train["clicks"].to_numpy())
    np.testing.assert_allclose(tr["clicks"], (clicks - clicks.mean()) / clicks.std(), atol=1e-4)
    # Labels and the default weight.
    np.testing.assert_array_equal(tr["clicked_label"], (raw["clicked"][:300] == "yes").to_numpy(np.float32))
    np.testing.assert_allclose(tr["watch_time_label"], train["watch_time"].to_numpy(), rtol=1e-6)
    assert (tr[WEIGHT_KEY] == 1.0).all() and (arrays["test"][WEIGHT_KEY] == 1.0).all()
    assert len(arrays["test"]["country"]) == 100
