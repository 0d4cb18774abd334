"""``virtshift bench``: drains measured from the cluster's own objects (``drain``), the
operator's cost at scale (``scale``), the lower bound they are judged against (``bound``) and
the generated report (``report``, docs/benchmarks.md)."""
