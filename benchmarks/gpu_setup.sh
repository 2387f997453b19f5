# Sourced by the one-call GPU scripts (host_overlap_ab.sh, prefix_caching_ab.sh): the results
# folder, NCCL without multicast, a compilation cache that outlives each run, and this tree
# installed into /tmp/sidp-now; "$now" runs a command against that install.
OUT="${OUT:-out}"
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 SIDP_JAX_CACHE=/tmp/sidp-cache
python3 -m pip install -q --upgrade --no-deps --no-build-isolation --target /tmp/sidp-now . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
now="env PYTHONPATH=/tmp/sidp-now"
