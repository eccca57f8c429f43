"""Run the whole pipeline on one machine: demo data, `trajflow run`, progress view, report."""
