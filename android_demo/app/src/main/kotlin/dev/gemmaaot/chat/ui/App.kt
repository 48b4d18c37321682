package dev.gemmaaot.chat.ui

import androidx.compose.foundation.isSystemInDarkTheme
import androidx.compose.material3.MaterialTheme
import androidx.compose.material3.darkColorScheme
import androidx.compose.material3.lightColorScheme
import androidx.compose.runtime.Composable
import androidx.compose.runtime.getValue
import androidx.lifecycle.compose.collectAsStateWithLifecycle
import dev.gemmaaot.chat.ChatViewModel
import dev.gemmaaot.chat.Screen

/** The UI only observes the view model's state (itself the core's ChatState) and sends intents. */
@Composable
fun App(model: ChatViewModel) {
    val screen by model.screen.collectAsStateWithLifecycle()
    MaterialTheme(colorScheme = if (isSystemInDarkTheme()) darkColorScheme() else lightColorScheme()) {
        when (val s = screen) {
            Screen.Searching -> LoadingScreen("Looking for a model…", null)
            is Screen.Loading -> LoadingScreen("Loading ${s.file}", "${s.sizeMb} MB; engine creation takes a few seconds")
            is Screen.NoModel -> NoModelScreen(s, onRetry = model::findAndLoad)
            is Screen.BadModel -> ProblemScreen("This file cannot be loaded", "${s.file}: ${s.reason}",
                onRetry = model::findAndLoad)
            is Screen.OutOfMemory -> ProblemScreen("Not enough memory",
                "${s.file} needs about ${s.needMb} MB; ${s.availableMb} MB are free. Close other apps " +
                    "or export a smaller quantization (--quant int4).", onRetry = model::findAndLoad)
            is Screen.Chat -> ChatScreen(model, s)
        }
    }
}
