import pandas as pd
import pytest

from analysis.tables import TableError, check_rows, read_table, write_table


def test_roundtrip_and_columns(tmp_path):
    df = pd.DataFrame({"layer": ["a", "b"], "value": [1.0, 2.0]})
    path = write_table(df, tmp_path, "metrics")
    assert path == tmp_path / "tables" / "metrics.parquet" and not list(path.parent.glob("*.tmp"))
    assert read_table(tmp_path, "metrics", ["layer", "value"]).equals(df)
    with pytest.raises(TableError, match=r"metrics.parquet: lacks columns \['seed'\]"):
        read_table(tmp_path, "metrics", ["seed"])


def test_missing_and_corrupt_tables_name_the_file(tmp_path):
    write_table(pd.DataFrame({"x": [1]}), tmp_path, "present")
    with pytest.raises(TableError, match=r"absent.parquet: missing; tables in this run: \['present'\]"):
        read_table(tmp_path, "absent")
    (tmp_path / "tables" / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(TableError, match="bad.parquet: unreadable parquet"):
        read_table(tmp_path, "bad")


def test_check_rows():
    df = pd.DataFrame({"x": [1, 2, 3]})
    assert check_rows(df, df.dropna(), "dropna") is not None
    with pytest.raises(TableError, match="2 rows where 3 were expected"):
        check_rows(df, df[df.x > 1], "filter")
