"""Real services for the tests, each in a module of its own: a private redis-server
(``redis_server``), moto's S3 server and a fault-injecting proxy in front of it (``s3_server``), a
private RabbitMQ node (``rabbitmq_server``). Servers run as subprocesses on free ports of 127.0.0.1
(the proxy in a thread of the test process, serving other processes too); nothing here touches a
Redis or RabbitMQ on the default ports.
"""

from tests.services.base import free_port
from tests.services.rabbitmq_server import RabbitServer
from tests.services.redis_server import RedisServer
from tests.services.s3_server import FaultyProxy, MotoServer, s3_test_env

__all__ = ["FaultyProxy", "MotoServer", "RabbitServer", "RedisServer", "free_port", "s3_test_env"]
