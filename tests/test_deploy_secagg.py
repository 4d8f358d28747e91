"""SecAgg+ on a device, in process: the signature covers what a device receives in SecAgg+'s FitIns.

The loopback SecAgg+ runs of the secure deployment (TLS, SuperNode authentication, signed
downloads; the unmasked mean against the devices' plain answers, distributed DP) are in
``test_deploy.py``, on the deployment the other deployment tests use.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from feddistill import protocol
from feddistill.client.distill import handle_distill
from feddistill.config import load_config
from feddistill.privacy.plan import run_privacy


@pytest.fixture()
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


# --------------------------------------------------------------------------- #
# in-process: the signature covers what a device receives in SecAgg+'s FitIns
# --------------------------------------------------------------------------- #
def test_a_device_refuses_a_tampered_signed_download_inside_secagg(task_identity, tmp_path, one_torch_thread):
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    from feddistill.client.secagg import SecAggRefused, answers_as_fitres
    from feddistill.data.fleet import load_fleet
    from feddistill.deploy.certs import generate_credentials
    from feddistill.deploy.download_signing import sign_download
    from feddistill.server.loop import round_config
    from feddistill.server.secagg import download_fitins
    from feddistill.strategies import teacher_arrays

    creds = generate_credentials(tmp_path / "certs", num_supernodes=1)
    cfg = load_config(
        None,
        {
            "fleet.num_clients": 3,
            "distill.query_size": 30,
            "distill.digest_epochs": 1,
            "distill.revisit_epochs": 1,
            "distill.secure_aggregation": "secagg+",
            "distill.secagg_num_shares": 3,
            "distill.secagg_reconstruction_threshold": 2,
            "security.release_public_key": str(creds.release_signing_pub),
            "output_dir": str(tmp_path / "run"),
        },
    )
    fleet = load_fleet(cfg.data, cfg.fleet, cfg.seed)
    queries = np.arange(cfg.distill.query_size)
    download = teacher_arrays(np.full((len(queries), 10), 0.1, np.float32), queries)
    config = round_config(cfg, fleet.splits.reference_digest, run_privacy(cfg))
    config[protocol.ROUND] = 1
    sign_download(config, download, key_path=str(creds.release_signing_key), rnd=1, run_id=1)
    request = Message(
        RecordDict({protocol.TEACHER_RECORD: download, protocol.CONFIG_RECORD: config}),
        dst_node_id=1,
        message_type=protocol.DISTILL,
    )
    fitins = download_fitins(request)
    context = Context(
        run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(), run_config={}
    )

    def masking_stage(parameters) -> Message:  # what secaggplus_mod hands its inner app
        fitins.parameters = parameters
        return Message(compat.fitins_to_recorddict(fitins, keep_input=True), dst_node_id=1, message_type="train")

    genuine = fitins.parameters
    reply = answers_as_fitres(masking_stage(genuine), context, cfg, handle_distill)
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=False)
    assert parameters_to_ndarrays(fitres.parameters)[0].shape == (cfg.distill.query_size, 10)
    arrays = parameters_to_ndarrays(genuine)
    arrays[0] = arrays[0].copy()
    arrays[0][0, 0] += 0.5  # the teacher signal (first array) changed on its way
    with pytest.raises(SecAggRefused, match="release rejected: tampered"):
        answers_as_fitres(masking_stage(ndarrays_to_parameters(arrays)), context, cfg, handle_distill)
