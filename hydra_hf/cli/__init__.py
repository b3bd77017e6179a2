"""Console scripts: `hydra-train` (`train`), `hydra-generate` (`generate`), `hydra-report` (`report`),
`hydra-export` (`export`)."""
