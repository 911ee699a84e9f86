"""Training and evaluation on top of `factory`: concept fine-tuning, students, evaluation, and the toyworld
model's recipe. Imports go one way: trainers use factory, factory never uses trainers."""
