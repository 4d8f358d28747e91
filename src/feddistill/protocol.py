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

# Records in a distill reply: the ONLY things that leave a device
ANSWERS_RECORD = "answers"  # ArrayRecord: ANSWERS (|Q|, C)
ANSWERS = "answers"
METRICS_RECORD = "metrics"  # MetricRecord: scalar metrics only
REPLY_META = "meta"  # ConfigRecord: round id and reference-set digest echoed back

# Config keys (request) / meta keys (reply)
ROUND = "round"
DIGEST = "reference-digest"
NUM_EXAMPLES = "num-examples"
SIGNATURE = "release-signature"  # Ed25519 signature of the round's download (feddistill.releases)
RELEASE_ID = "release-id"
PARTITION = "partition-id"  # the node's partition id (simulation) or node-config id (device)
DEVICE = "device"  # identify reply: 1 when the node is a device reading its own data dir (node config data-dir)

# Error code of a client's refusal (digest mismatch, over its own budget, bad signature...)
REFUSED = 1
DROPPED = 2  # a simulated dropout: the client was sampled but sends no answer
