"""Names of the records and keys exchanged between ServerApp and ClientApp.

Defined once here, used by server, client, strategies and tests.
"""

# Message types (Flower: "<category>.<action>")
DISTILL = "train.distill"  # one federated-distillation round
FEDAVG_TRAIN = "train"  # Flower's FedAvg baseline uses the default train action
IDENTIFY = "query.identify"  # a node says which partition (simulation) / device id it serves

# Records in a distill request
TEACHER_RECORD = "teacher"  # ArrayRecord: SIGNAL (|Q|, C) float32, QUERIES (|Q|,) int64
CONFIG_RECORD = "config"  # ConfigRecord: round config (below)
SIGNAL = "signal"
QUERIES = "queries"
STUDENT_PREFIX = "student."  # optional: the global student's weights, "student.<parameter name>"
# SecAgg+ (legacy fit layout): the FitIns config key naming the FitIns parameters, a JSON list
SECAGG_ARRAY_NAMES = "feddistill.array-names"

# Records in a distill reply: the ONLY things that leave a device. The schema (types, ranges,
# sizes) is declared and enforced in feddistill.strategies.validation; anything else is rejected.
ANSWERS_RECORD = "answers"  # ArrayRecord: exactly one Array ANSWERS, (|Q|, C) or (|Q|,) votes
ANSWERS = "answers"
# An abstention (distill.abstain-*): an all-zero answer row, or this one-byte vote (classes are 0..C-1, C <= 255)
ABSTAIN_VOTE = 255
METRICS_RECORD = "metrics"  # optional MetricRecord: at most RECORD_EPSILON
RECORD_EPSILON = "record-epsilon"  # the device's own record-level ledger epsilon (record-level DP only)
REPLY_META = "meta"  # ConfigRecord: exactly ROUND and DIGEST, echoed back

# Config keys (request) / meta keys (reply)
ROUND = "round"
DIGEST = "reference-digest"
PRIVACY_PLAN = "privacy-plan"  # request: the run's privacy plan as JSON (feddistill.privacy.plan.RunPrivacy)
NUM_EXAMPLES = "num-examples"  # Flower's FedAvg baseline only; never part of a distill reply
SIGNATURE = "release-signature"  # Ed25519 signature of the round's download (feddistill.deploy.download_signing)
RELEASE_ID = "release-id"  # the id the download is signed under (download_signing.download_id)
# identify reply (query.identify, once at start-up) only: the server maps Flower's node id to this
# client id; a distill reply never names its sender
PARTITION = "partition-id"  # the node's partition id (simulation) or node-config id (device)
DEVICE = "device"  # identify reply: 1 when the node is a device reading its own data dir (node config data-dir)

# Error code of a client's refusal (digest mismatch, over its own budget, bad signature...)
REFUSED = 1
DROPPED = 2  # a simulated dropout: the client was sampled but sends no answer
