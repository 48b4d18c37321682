package dev.gemmaaot.chat

import com.google.ai.edge.litertlm.Backend
import com.google.ai.edge.litertlm.Engine
import com.google.ai.edge.litertlm.EngineConfig
import com.google.ai.edge.litertlm.InputData
import com.google.ai.edge.litertlm.ResponseCallback
import com.google.ai.edge.litertlm.SamplerConfig
import com.google.ai.edge.litertlm.Session
import com.google.ai.edge.litertlm.SessionConfig
import dev.gemmaaot.core.SamplerSettings
import dev.gemmaaot.core.Turn
import java.io.File
import java.util.concurrent.CancellationException

/**
 * The only code that talks to LiteRT-LM. Each reply runs in a fresh [Session] fed
 * [Turn.engineInput]: the session adds <bos> and the bundle's turn templates, so the model sees
 * exactly the prompt the core rendered (the Python runtime's prompt for the same turns).
 */
class LlmEngine private constructor(private val engine: Engine, val backendName: String) : AutoCloseable {
    @Volatile private var session: Session? = null

    interface Listener {
        fun onPiece(text: String)
        fun onDone()
        fun onError(message: String)
    }

    fun generate(turn: Turn, settings: SamplerSettings, listener: Listener) {
        val config = SessionConfig(samplerConfig = SamplerConfig(
            topK = settings.topK, topP = settings.topP, temperature = settings.temperature,
            seed = settings.seed))
        val s = engine.createSession(config)
        session = s
        s.generateContentStream(listOf(InputData.Text(turn.engineInput)), object : ResponseCallback {
            override fun onNext(response: String) = listener.onPiece(response)
            override fun onDone() { finish(s); listener.onDone() }
            override fun onError(throwable: Throwable) {
                finish(s)
                // cancelProcess() ends the stream with a CancellationException: a normal stop
                if (throwable is CancellationException) listener.onDone()
                else listener.onError(throwable.message ?: throwable.toString())
            }
        })
    }

    /** Stops the reply in flight (its callback then reports done). */
    fun cancel() { session?.cancelProcess() }

    private fun finish(s: Session) {
        if (session === s) session = null
        runCatching { s.close() }
    }

    override fun close() {
        cancel()
        runCatching { engine.close() }
    }

    companion object {
        /** Blocking (seconds): call off the main thread. GPU falls back to CPU if it fails. */
        fun open(model: File, useGpu: Boolean, cacheDir: File): LlmEngine {
            if (useGpu) {
                try {
                    return create(model, Backend.GPU(), "GPU", cacheDir)
                } catch (e: Exception) {
                    // the phone has no usable OpenCL: the CPU backend runs everywhere
                }
            }
            return create(model, Backend.CPU(), "CPU", cacheDir)
        }

        /** The KV cache length is the bundle's own (its LlmMetadata max_num_tokens). */
        private fun create(model: File, backend: Backend, name: String, cacheDir: File): LlmEngine {
            val engine = Engine(EngineConfig(modelPath = model.absolutePath, backend = backend,
                                             cacheDir = cacheDir.absolutePath))
            try {
                engine.initialize()
            } catch (e: Throwable) {
                runCatching { engine.close() }
                throw e
            }
            return LlmEngine(engine, name)
        }
    }
}
