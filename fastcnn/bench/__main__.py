import sys

from fastcnn.bench import main

sys.exit(main())
