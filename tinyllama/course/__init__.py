"""Course mode: lessons on the Llama architecture with exercises graded against tinyllama/model/.

    python -m tinyllama.course list | start <lesson> | check <lesson> | train

- `lessons`: the lesson registry and the learner's workspace (start never overwrites);
- `grading`: loading the learner's file, running named cases, hints for the first failure;
- `checks/`: one module per lesson, comparing the learner's code with the reference;
- `stubs/`: the exercise files that `start` copies;
- `final`: the final exercise, the learner's pieces inside the real model (via `ModelParts`).
The pages themselves live in course/en/ and course/zh/ at the top of the repository.
"""
