import os
import tempfile

# Tests never read or write the user's teacher cache.
os.environ.setdefault("FEDDISTILL_CACHE", tempfile.mkdtemp(prefix="feddistill-cache-"))
# Flower must never try to install an app's dependencies at run time (there is no internet).
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
