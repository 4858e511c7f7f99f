from tests.daemon import DaemonProcess


def test_append_then_ping_sees_it(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        answer = client.append({"action_type": "PlanStarted", "plan_id": "p1"})
        assert answer["seq"] == 0
        assert client.ping() == 1
