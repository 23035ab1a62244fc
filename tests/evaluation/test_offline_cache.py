"""The prepared offline task data is a cache: a damaged record is named, dropped and prepared again."""

import logging

from gisp_plugin.evaluation.offline_data import PREPARED_MARKER, prepare_offline_tasks


def test_damaged_task_record_is_prepared_again(tmp_path, caplog):
    root = prepare_offline_tasks(["openbookqa"], root=tmp_path)
    marker = root / "openbookqa" / PREPARED_MARKER
    whole = marker.read_text()
    marker.write_text(whole[:15])  # truncated
    with caplog.at_level(logging.WARNING, logger="gisp_plugin.evaluation.offline_data"):
        prepare_offline_tasks(["openbookqa"], root=tmp_path)
    assert f"offline task record {marker} is damaged" in caplog.text
    assert marker.read_text() == whole
