"""`sidp_jax.ray`, the name users import: the job on a Ray cluster (sidp_jax/jobs/ray_job.py)."""

from sidp_jax.jobs.ray_job import (RayOptions, SiDPProcessor, SiDPProcessorConfig, SiDPWorker,  # noqa: F401
                               build_sidp_processor, import_ray, records_table, run_ray_job, run_rows)

__all__ = ["RayOptions", "SiDPProcessor", "SiDPProcessorConfig", "SiDPWorker", "build_sidp_processor",
           "import_ray", "records_table", "run_ray_job", "run_rows"]
