"""entroprl inside other trainers: TRL (`entroprl.integrations.trl`) and verl
(`entroprl.integrations.verl`). Each module imports its framework; this package imports neither."""
