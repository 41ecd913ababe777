"""Fine-tuning machinery behind `longrope finetune`: process groups and model wrapping (`distributed`),
training windows in a resumable order (`data`), checkpoints and the final Hugging Face save (`checkpoint`)."""
