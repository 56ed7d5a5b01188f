import os

# Before anything imports torch: torch's OpenMP threads sleep instead of spin-waiting at barriers (see
# attnlab/__init__.py); on the shared 2-core machine spinning made 2-thread tests 5-20x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
