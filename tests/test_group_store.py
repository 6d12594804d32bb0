"""Per-group globals and federated-evaluation rows in the store, on SQLite and PostgreSQL, and their means."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import IntegrityError

from aggregator.groups import eval_means
from aggregator.state import Store


def test_group_globals_and_evals_roundtrip(db_url, tmp_path):
    store = Store(db_url, tmp_path / "blobs")
    with store.write() as tx:
        for client, layers in (("deep", [0, 1, 2, 3]), ("a", [0, 3]), ("b", [0, 3]), ("c", [1, 2])):
            tx.insert_client(client, "salt", "hash", layers, "{}", client, 0.0)
        tx.insert_group_globals(1, [{"kept_layers": [0, 3], "blob": "b03", "clients": 2, "examples": 7},
                                    {"kept_layers": [0, 1, 2, 3], "blob": "b0123", "clients": 1, "examples": 4}])
        for round_id, client, loss, n in ((1, "deep", 2.0, 4), (1, "a", 3.0, 1), (1, "b", 4.0, 3), (1, "c", 8.0, 2),
                                          (2, "a", 1.0, 1)):
            tx.insert_upload_eval(round_id, client, loss, n)
    with store.read() as tx:
        assert tx.group_global(1, (0, 3)) == "b03" and tx.group_global(1, [0, 1, 2, 3]) == "b0123"
        assert tx.group_global(1, [0, 1]) is None and tx.group_global(2, [0, 3]) is None
        assert [g["kept_layers"] for g in tx.group_globals(1)] == [[0, 1, 2, 3], [0, 3]] and tx.group_globals(0) == []
        means = eval_means(tx.upload_evals())
        assert eval_means(tx.upload_evals(2)) == {2: means[2]}
    # depth 2 holds two groups ([0, 3] and [1, 2]); its mean weighs every client by its examples
    assert means[1][2]["loss"] == pytest.approx((3.0 * 1 + 4.0 * 3 + 8.0 * 2) / 6)
    assert (means[1][2]["examples"], means[1][2]["clients"]) == (6, 3)
    assert [(g["kept_layers"], g["loss"], g["examples"]) for g in means[1][2]["groups"]] == [
        ([0, 3], 3.75, 4), ([1, 2], 8.0, 2)]
    assert (means[1][4]["loss"], means[2][2]["loss"], list(means[1])) == (2.0, 1.0, [4, 2])
    with pytest.raises(IntegrityError), store.write() as tx:  # one evaluation per client and round
        tx.insert_upload_eval(1, "a", 9.0, 9)
    store.dispose()
